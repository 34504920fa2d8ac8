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
from transformers import CLIPTokenizer, T5TokenizerFast

from difcompress.core.errors import UserError
from difcompress.core.files import build_once, read_json, read_text
from difcompress.data.datasets import CAPTION_COLUMNS
from difcompress.data.metadata import read_rows

SHARD_CAPTIONS = 4096
CACHE_FORMAT = 2  # shards keyed by condition name (1: one "encodings" tensor)


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


def _fingerprint(parts: list[tuple[Any, nn.Module]]) -> str:
    """What identifies encodings: every tokenizer's vocabulary and every encoder's config and weights."""
    digest = hashlib.sha256()
    for tokenizer, model in parts:
        digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _truncated(tokenizer, prompts: list[str]) -> list[str]:
    """The prompts longer than the tokenizer's window (with its start and end tokens)."""
    limit = int(tokenizer.model_max_length)
    return [p for p, ids in zip(prompts, tokenizer(prompts, truncation=False, verbose=False).input_ids) if len(ids) > limit]


def _tokens(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=int(tokenizer.model_max_length), truncation=True,
                     return_tensors="pt").input_ids.to(device)


@dataclass
class TextEncoder:
    """Stable Diffusion's text side: one tokenizer and (frozen) CLIP text encoder, whose last
    hidden states the U-Net reads."""

    tokenizer: Any = field(repr=False)
    model: nn.Module = field(repr=False)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def truncated(self, prompts: list[str]) -> list[str]:
        return _truncated(self.tokenizer, prompts)

    def components(self) -> dict[str, Any]:
        """The pipeline components, by their model_index names."""
        return {"tokenizer": self.tokenizer, "text_encoder": self.model}

    def with_models(self, change) -> TextEncoder:
        """The same text side with `change(model)` applied to each encoder (device, dtype)."""
        return TextEncoder(self.tokenizer, change(self.model))

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
        """{"encoder_hidden_states": (N, tokens, width)}: the last hidden states, as
        StableDiffusionPipeline computes them."""
        device = next(self.model.parameters()).device
        out = [self.model(_tokens(self.tokenizer, prompts[start:start + batch_size], device))[0].float().cpu()
               for start in range(0, len(prompts), batch_size)]
        return {"encoder_hidden_states": torch.cat(out) if out else torch.empty(0)}

    def fingerprint(self) -> str:
        return _fingerprint([(self.tokenizer, self.model)])


@dataclass
class DualTextEncoder:
    """SDXL's text side: CLIP ViT-L and OpenCLIP ViT-bigG (with projection). The U-Net reads
    both encoders' penultimate hidden states side by side, and the second one's pooled,
    projected output (``text_embeds``), as StableDiffusionXLPipeline.encode_prompt builds them."""

    tokenizer: Any = field(repr=False)
    model: nn.Module = field(repr=False)
    tokenizer_2: Any = field(repr=False)
    model_2: nn.Module = field(repr=False)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def truncated(self, prompts: list[str]) -> list[str]:
        return _truncated(self.tokenizer, prompts)  # both tokenizers share CLIP's 77-token window

    def components(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "text_encoder": self.model, "tokenizer_2": self.tokenizer_2,
                "text_encoder_2": self.model_2}

    def with_models(self, change) -> DualTextEncoder:
        return DualTextEncoder(self.tokenizer, change(self.model), self.tokenizer_2, change(self.model_2))

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
        """{"encoder_hidden_states": (N, tokens, width_1 + width_2), "text_embeds": (N, projection)}."""
        device = next(self.model.parameters()).device
        states, pooled = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            first = self.model(_tokens(self.tokenizer, chunk, device), output_hidden_states=True)
            second = self.model_2(_tokens(self.tokenizer_2, chunk, device), output_hidden_states=True)
            states.append(torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1).float().cpu())
            pooled.append(second.text_embeds.float().cpu())
        if not states:
            return {"encoder_hidden_states": torch.empty(0), "text_embeds": torch.empty(0)}
        return {"encoder_hidden_states": torch.cat(states), "text_embeds": torch.cat(pooled)}

    def fingerprint(self) -> str:
        return _fingerprint([(self.tokenizer, self.model), (self.tokenizer_2, self.model_2)])


def _pooled(output) -> torch.Tensor:
    """A CLIP encoder's pooled output: the projected one where it has a projection
    (CLIPTextModelWithProjection, SD3's pair), else the pooler's (CLIPTextModel, Flux's)."""
    projected = getattr(output, "text_embeds", None)
    return output.pooler_output if projected is None else projected


@dataclass
class ClipT5TextEncoder:
    """The text side of the flow-matching MMDiTs: CLIP encoders for the pooled vector
    (``pooled_projections``, their pooled outputs side by side) and T5 for the sequence
    (``encoder_hidden_states``, padded to `max_sequence_length` tokens). With `clip_sequence`
    (SD3), the CLIP encoders' penultimate hidden states, side by side and zero-padded to T5's
    width, come before T5's tokens, as StableDiffusion3Pipeline.encode_prompt builds them;
    without it (Flux) the sequence is T5's alone. Components are named in order: tokenizer /
    text_encoder, then _2, _3 (SD3: CLIP-L, CLIP-G, T5; Flux: CLIP-L, T5)."""

    clips: tuple[tuple[Any, nn.Module], ...] = field(repr=False)
    t5_tokenizer: Any = field(repr=False)
    t5: nn.Module = field(repr=False)
    max_sequence_length: int = 256
    clip_sequence: bool = True

    @property
    def max_length(self) -> int:
        """T5's window: what a caption is truncated to (CLIP's 77 tokens truncate silently, as in the pipeline)."""
        return self.max_sequence_length

    def truncated(self, prompts: list[str]) -> list[str]:
        limit = self.max_sequence_length
        ids = self.t5_tokenizer(prompts, truncation=False, verbose=False).input_ids
        return [p for p, tokens in zip(prompts, ids) if len(tokens) > limit]

    def components(self) -> dict[str, Any]:
        parts = [*self.clips, (self.t5_tokenizer, self.t5)]
        suffixes = [""] + [f"_{i}" for i in range(2, len(parts) + 1)]
        return {name + suffix: part for suffix, (tokenizer, model) in zip(suffixes, parts)
                for name, part in (("tokenizer", tokenizer), ("text_encoder", model))}

    def with_models(self, change) -> ClipT5TextEncoder:
        return ClipT5TextEncoder(tuple((t, change(m)) for t, m in self.clips), self.t5_tokenizer, change(self.t5),
                                 self.max_sequence_length, self.clip_sequence)

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
        """{"encoder_hidden_states": (N, [clip tokens +] T5 tokens, T5 width), "pooled_projections": (N, pooled)}."""
        states, pooled = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            sequence, vector = self._encode_chunk(chunk)
            states.append(sequence.float().cpu())
            pooled.append(vector.float().cpu())
        if not states:
            return {"encoder_hidden_states": torch.empty(0), "pooled_projections": torch.empty(0)}
        return {"encoder_hidden_states": torch.cat(states), "pooled_projections": torch.cat(pooled)}

    def _encode_chunk(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.t5.parameters()).device
        clip_window = int(self.clips[0][0].model_max_length)  # the pipeline pads every CLIP to the first's window
        outputs = [model(tokenizer(prompts, padding="max_length", max_length=clip_window, truncation=True,
                                   return_tensors="pt").input_ids.to(device), output_hidden_states=True)
                   for tokenizer, model in self.clips]
        t5_ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length,
                                   truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        sequence = self.t5(t5_ids.to(device))[0]
        if self.clip_sequence:
            clip_states = torch.cat([out.hidden_states[-2] for out in outputs], -1).to(sequence.dtype)
            clip_states = nn.functional.pad(clip_states, (0, sequence.shape[-1] - clip_states.shape[-1]))
            sequence = torch.cat([clip_states, sequence], -2)
        return sequence, torch.cat([_pooled(out) for out in outputs], -1)

    def fingerprint(self) -> str:
        return _fingerprint([*self.clips, (self.t5_tokenizer, self.t5)]) + f"-{self.max_sequence_length}"


@dataclass
class ChatTextEncoder:
    """A chat language model as text encoder (Z-Image's Qwen3): each prompt wrapped in the
    tokenizer's chat template as one user turn, padded to `max_sequence_length`, and the
    penultimate hidden states of its real tokens read, as ZImagePipeline._encode_prompt does.
    Prompts differ in length, so the encodings are the states zero-padded to the window
    (``cap_feats``) and which tokens are real (``cap_mask``, 1.0 / 0.0)."""

    tokenizer: Any = field(repr=False)
    model: nn.Module = field(repr=False)
    max_sequence_length: int = 512

    @property
    def max_length(self) -> int:
        return self.max_sequence_length

    def templated(self, prompts: list[str]) -> list[str]:
        return [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=True) for p in prompts]

    def truncated(self, prompts: list[str]) -> list[str]:
        ids = self.tokenizer(self.templated(prompts), truncation=False, verbose=False).input_ids
        return [p for p, tokens in zip(prompts, ids) if len(tokens) > self.max_sequence_length]

    def components(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "text_encoder": self.model}

    def with_models(self, change) -> ChatTextEncoder:
        return ChatTextEncoder(self.tokenizer, change(self.model), self.max_sequence_length)

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
        """{"cap_feats": (N, window, width), "cap_mask": (N, window)}."""
        device = next(self.model.parameters()).device
        states, masks = [], []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(self.templated(prompts[start:start + batch_size]), padding="max_length",
                                    max_length=self.max_sequence_length, truncation=True, return_tensors="pt")
            mask = tokens.attention_mask.to(device).bool()
            hidden = self.model(input_ids=tokens.input_ids.to(device), attention_mask=mask,
                                output_hidden_states=True).hidden_states[-2]
            states.append((hidden * mask[..., None]).float().cpu())
            masks.append(mask.float().cpu())
        if not states:
            return {"cap_feats": torch.empty(0), "cap_mask": torch.empty(0)}
        return {"cap_feats": torch.cat(states), "cap_mask": torch.cat(masks)}

    def fingerprint(self) -> str:
        chat = hashlib.sha256(str(self.tokenizer.chat_template).encode()).hexdigest()[:8]
        return _fingerprint([(self.tokenizer, self.model)]) + f"-{chat}-{self.max_sequence_length}"


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


def cached_text(captions: list[str], text, cache_root: Path, *, encode_here: bool = True
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(caption encodings by condition name, each (N, ...) in fp16; the empty prompt's
    encodings (one row, fp32); report), encoded once per (text encoder, captions) and read
    back afterwards."""
    key = hashlib.sha256(f"{text.fingerprint()}:{json.dumps(captions)}:{CACHE_FORMAT}".encode()).hexdigest()[:20]
    folder = Path(cache_root) / "text" / key
    index, reused = build_once(folder, lambda tmp: _write(captions, text, tmp), build_here=encode_here)
    shards = [load_file(folder / name) for name in index["shards"]]
    encodings = {name: torch.cat([shard[name] for shard in shards]) for name in shards[0]} if shards else {}
    empty = load_file(folder / "empty.safetensors")
    return encodings, empty, {"folder": str(folder), "reused": reused, "captions": len(captions)}


def _write(captions: list[str], text, folder: Path) -> None:
    shards = []
    for start in range(0, len(captions), SHARD_CAPTIONS):
        name = f"shard-{len(shards):05d}.safetensors"
        encodings = text.encode(captions[start:start + SHARD_CAPTIONS])
        save_file({n: v.half().contiguous() for n, v in encodings.items()}, folder / name)
        shards.append(name)
    save_file({n: v.contiguous() for n, v in text.encode([""]).items()}, folder / "empty.safetensors")
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


def write_t5_tokenizer(folder: Path, model_max_length: int = 64) -> Path:
    """A T5 (unigram) tokenizer whose vocabulary this project writes: T5's pad, end and
    unknown tokens, the word-start mark and one piece per printable character, no sentinel
    ids. For tiny Flux / SD3 pipelines (tests, embedded teachers), so nothing is downloaded."""
    folder = Path(folder)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(chr(c), -3.0) for c in range(33, 127)]
    T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length).save_pretrained(folder)
    return folder
