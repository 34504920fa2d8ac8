"""Image-quality and cost metrics: ``extractors`` (feature networks and image features),
``fid`` (FID/KID and reference statistics), ``clip`` (CLIP score of prompts and images) and
``cost`` (parameters, MACs, latency, memory)."""
