"""Z-Image (ZImageTransformer2DModel in ZImagePipeline) on a tiny pipeline built from configs
(tests/tiny_flow.py): its chat-templated Qwen3 text side, and the stock pipeline reloading it
offline."""

import pytest
import torch
from diffusers import ZImagePipeline
from tiny_flow import build_tiny_zimage

from difcompress.data.text import ChatTextEncoder

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a handwritten 7", "", "a handwritten 0 on a page"]


@pytest.fixture(scope="module")
def tiny_zimage_dir(tmp_path_factory):
    return build_tiny_zimage(tmp_path_factory.mktemp("models") / "tiny-zimage")


@pytest.fixture(scope="module")
def zimage_pipe(tiny_zimage_dir):
    return ZImagePipeline.from_pretrained(tiny_zimage_dir)


def test_text_side_encodes_as_the_pipeline(zimage_pipe):
    """The penultimate Qwen3 states of each templated prompt's real tokens, padded to the
    512-token window with a mask saying which are real."""
    text = ChatTextEncoder(zimage_pipe.tokenizer, zimage_pipe.text_encoder)
    mine = text.encode(PROMPTS)
    with torch.no_grad():
        reference, _ = zimage_pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)
    assert mine["cap_feats"].shape == (3, 512, 32) and mine["cap_mask"].shape == (3, 512)
    for row, expected in enumerate(reference):
        real = mine["cap_mask"][row] > 0
        assert int(real.sum()) == len(expected)
        torch.testing.assert_close(mine["cap_feats"][row][real], expected)
        assert mine["cap_feats"][row][~real].abs().max() == 0


def test_text_side_truncation_counts_the_template(zimage_pipe):
    text = ChatTextEncoder(zimage_pipe.tokenizer, zimage_pipe.text_encoder, max_sequence_length=24)
    # the template adds 19 tokens around the prompt ("<|im_start|>user\n" ... "assistant\n", one per byte)
    assert text.truncated(["a" * 5, "a" * 6]) == ["a" * 6]
    assert text.fingerprint() != ChatTextEncoder(zimage_pipe.tokenizer, zimage_pipe.text_encoder).fingerprint()
