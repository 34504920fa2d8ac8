"""Image-quality and cost metrics: ``extractors`` (feature networks and image features),
``fid`` (FID/KID and reference statistics) and ``cost`` (parameters, MACs, latency, memory)."""
