"""SD3 / SD3.5 (SD3Transformer2DModel in StableDiffusion3Pipeline) on a tiny pipeline built
from configs (tests/tiny_flow.py): its text side, and the stock pipeline reloading it offline."""

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from tiny_flow import build_tiny_sd3

from difcompress.data.text import ClipT5TextEncoder

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a handwritten 7", "", "a handwritten 0 on a page"]


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="module")
def sd3_pipe(tiny_sd3_dir):
    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)


def sd3_text(pipe, max_sequence_length=256):
    return ClipT5TextEncoder(((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)),
                             pipe.tokenizer_3, pipe.text_encoder_3, max_sequence_length, clip_sequence=True)


def test_tiny_sd3_has_the_sd35_quirks(sd3_pipe):
    blocks = sd3_pipe.transformer.transformer_blocks
    assert [b.use_dual_attention for b in blocks] == [True, False, False, False]
    assert [b.context_pre_only for b in blocks] == [False, False, False, True]


def test_text_side_encodes_as_the_pipeline(sd3_pipe):
    """CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width, before
    T5's 256 tokens; both pooled outputs side by side."""
    text = sd3_text(sd3_pipe)
    mine = text.encode(PROMPTS)
    with torch.no_grad():
        states, _, pooled, _ = sd3_pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=256)
    assert mine["encoder_hidden_states"].shape == (3, 16 + 256, 32)
    torch.testing.assert_close(mine["encoder_hidden_states"], states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine["pooled_projections"], pooled)
    assert set(text.components()) == {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2",
                                      "tokenizer_3", "text_encoder_3"}


def test_text_side_reports_t5_truncation_and_fingerprints_its_window(sd3_pipe):
    short = sd3_text(sd3_pipe, max_sequence_length=8)
    assert short.truncated(["a handwritten 7", "ab"]) == ["a handwritten 7"]
    assert short.fingerprint() != sd3_text(sd3_pipe).fingerprint()


def test_cached_encodings_read_back(sd3_pipe, tmp_path):
    from difcompress.data.text import cached_text

    text = sd3_text(sd3_pipe)
    encodings, empty, report = cached_text(PROMPTS, text, tmp_path)
    again, _, second = cached_text(PROMPTS, text, tmp_path)
    assert not report["reused"] and second["reused"]
    assert set(encodings) == {"encoder_hidden_states", "pooled_projections"}
    torch.testing.assert_close(again["pooled_projections"], encodings["pooled_projections"])
    assert empty["encoder_hidden_states"].shape == (1, 272, 32)
