"""The frozen text side of a text-to-image pipeline: its tokenizer and text encoder, and a
disk cache of encoded captions.

Stable Diffusion's U-Net reads the text encoder's last hidden states
(``encoder_hidden_states``, shaped (tokens, width)); the encoder is frozen, so captions are
encoded once and read back, like the VAE latents (data/latents.py). The empty prompt's
encoding is the "no caption" condition classifier-free guidance drops captions to.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTokenizer

from difcompress.core.errors import UserError
from difcompress.core.files import build_once, read_json, read_text
from difcompress.data.datasets import CAPTION_COLUMNS
from difcompress.data.metadata import read_rows

SHARD_CAPTIONS = 4096


def load_transformers_part(cls: Any, folder: Path, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder)`` without transformers' per-tensor progress bar (noise for
    a local read), any failure one clear error naming ``what``."""
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        return cls.from_pretrained(folder, **kwargs)
    except Exception as err:  # transformers raises many types for missing or damaged files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load {what}: {first}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


@dataclass
class TextEncoder:
    """A pipeline's tokenizer and (frozen) text encoder."""

    tokenizer: Any = field(repr=False)
    model: nn.Module = field(repr=False)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N, tokens, width) last hidden states, as StableDiffusionPipeline computes them."""
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(prompts[start:start + batch_size], padding="max_length",
                                    max_length=self.max_length, truncation=True, return_tensors="pt")
            out.append(self.model(tokens.input_ids.to(device))[0].float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode())
        digest.update(json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts from a file: one per line (.txt), a caption column (.csv, .jsonl), or a COCO
    captions file (.json with an "annotations" list)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"prompts file {path} does not exist")
    if not path.is_file():  # a folder, a device (/dev/zero), a pipe: nothing to read to the end
        raise UserError(f"prompts file {path} is not a regular file; pass a .txt, .csv, .jsonl or .json file")
    try:
        if path.suffix == ".json":
            return [a["caption"].strip() for a in read_json(path)["annotations"]]
        if path.suffix in (".jsonl", ".csv"):
            rows = [row for _, row in read_rows(path)]
            if not rows:
                raise UserError(f"{path} holds no rows")
            return [str(r[column or _caption_key(rows[0], path)]) for r in rows]
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise UserError(f"cannot read prompts from {path}: {err}") from None
    prompts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def _caption_key(row: dict[str, Any], path: Path) -> str:
    key = next((k for k in CAPTION_COLUMNS if k in row), None)
    if key is None:
        raise UserError(f"{path} has no caption column ({', '.join(CAPTION_COLUMNS)}); pass --caption-column")
    return key


def cached_text(captions: list[str], text: TextEncoder, cache_root: Path, *, encode_here: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(caption encodings (N, tokens, width) in fp16, the empty prompt's encoding, report),
    encoded once per (text encoder, captions) and read back afterwards."""
    key = hashlib.sha256(f"{text.fingerprint()}:{json.dumps(captions)}".encode()).hexdigest()[:20]
    folder = Path(cache_root) / "text" / key
    index, reused = build_once(folder, lambda tmp: _write(captions, text, tmp), build_here=encode_here)
    encodings = torch.cat([load_file(folder / name)["encodings"] for name in index["shards"]])
    empty = load_file(folder / "empty.safetensors")["encoding"]
    return encodings, empty, {"folder": str(folder), "reused": reused, "captions": len(captions)}


def _write(captions: list[str], text: TextEncoder, folder: Path) -> None:
    shards = []
    for start in range(0, len(captions), SHARD_CAPTIONS):
        name = f"shard-{len(shards):05d}.safetensors"
        encodings = text.encode(captions[start:start + SHARD_CAPTIONS]).half().contiguous()
        save_file({"encodings": encodings}, folder / name)
        shards.append(name)
    save_file({"encoding": text.encode([""])[0].contiguous()}, folder / "empty.safetensors")
    (folder / "index.json").write_text(json.dumps({"shards": shards, "captions": len(captions)}, indent=2) + "\n")


def write_character_tokenizer(folder: Path, model_max_length: int = 16) -> Path:
    """A CLIP tokenizer whose vocabulary this project writes: one token per character (with
    and without CLIP's end-of-word mark) and no merges. Tiny pipelines (the embedded
    digits-t2i teacher, tests) use it so nothing is downloaded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              model_max_length=model_max_length, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return folder
