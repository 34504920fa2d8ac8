"""CLIP score: how well generated images match their prompts, the mean cosine similarity of
CLIP's image and text embeddings (as BK-SDM reports it, not multiplied by 100)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from difcompress.data.text import load_transformers_part

# CLIP's image normalisation (openai/clip; the same values in every CLIPImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """A transformers CLIPModel folder (safetensors) with its tokenizer."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        what = f"--clip-model {folder} (a CLIPModel folder with its tokenizer)"
        self.model = load_transformers_part(CLIPModel, Path(folder), what, use_safetensors=True).eval().to(device)
        self.tokenizer = load_transformers_part(CLIPTokenizer, Path(folder), what)
        self.device = torch.device(device)
        self.size = self.model.config.vision_config.image_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Cosine similarity per (image in [-1, 1], prompt) pair."""
        x = (images.to(self.device).float() + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        x = (x - torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)) / torch.tensor(
            CLIP_STD, device=self.device).view(1, 3, 1, 1)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        # The projections spelled out: get_*_features changed return types across transformers versions.
        image = self.model.visual_projection(self.model.vision_model(pixel_values=x).pooler_output)
        text = self.model.text_projection(self.model.text_model(**tokens).pooler_output)
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        return (image * text).sum(-1).cpu()
