"""Latent pipelines: the latent cache (encoded once, reused), the U-Net over VQ latents
(LDMPipeline) through the whole chain, and a latent pipeline missing its autoencoder."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_distill, run_eval, run_export, run_prune
from diffusers import LDMPipeline

from difcompress.builtin import builtin_data
from difcompress.core.errors import UserError
from difcompress.data.datasets import TensorImageDataset
from difcompress.data.latents import Autoencoder, cached_latents
from difcompress.loading.models import load_model

pytestmark = pytest.mark.usefixtures("single_thread")


def test_latent_cache_encodes_once_and_is_reused(tiny_dit_dir, tmp_path, monkeypatch):
    loaded = load_model(str(tiny_dit_dir))
    data = builtin_data("digits", 16, 3)
    calls = []
    real_encode = Autoencoder.encode
    monkeypatch.setattr(Autoencoder, "encode", lambda self, x: calls.append(len(x)) or real_encode(self, x))

    first, report = cached_latents(data, loaded.autoencoder, image_size=16, cache_root=tmp_path, show_progress=False)
    assert sum(calls) == len(data) and not report["reused"]
    shards = sorted((tmp_path / "latents").rglob("shard-*.safetensors"))
    assert shards and json.loads((shards[0].parent / "index.json").read_text())["scaling_factor"] == 0.18215

    calls.clear()
    again, report = cached_latents(data, loaded.autoencoder, image_size=16, cache_root=tmp_path, show_progress=False)
    assert calls == [] and report["reused"]
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, data.labels)
    # The latents are the scaled posterior means the stock pipeline's decode expects.
    expected = loaded.autoencoder.model.encode(data.images[:2]).latent_dist.mean * 0.18215
    assert torch.allclose(first.images[:2], expected, atol=1e-5)

    other = TensorImageDataset(data.images[:10], data.labels[:10])
    _, report = cached_latents(other, loaded.autoencoder, image_size=16, cache_root=tmp_path, show_progress=False)
    assert not report["reused"]  # different data, different cache


def test_distill_runs_share_the_cache(tiny_dit_dir, tmp_path):
    pruned = tmp_path / "pruned"
    run_prune(str(tiny_dit_dir), 0.5, pruned, device="cpu")
    kwargs = dict(loss="mse", data="digits", steps=1, batch_size=4, checkpoint_every=0, device="cpu",
                  show_progress=False, latent_cache=tmp_path / "cache")
    assert run_distill(str(pruned), tmp_path / "a", **kwargs)["latent_cache"]["reused"] is False
    # The same VAE read from another folder (a copy, a later run) is the same cache key.
    shutil.copytree(pruned, tmp_path / "elsewhere")
    assert run_distill(str(tmp_path / "elsewhere"), tmp_path / "b", **kwargs)["latent_cache"]["reused"] is True
    assert run_distill(str(tmp_path / "a"), tmp_path / "c", **kwargs)["latent_cache"]["reused"] is True


def test_ldm_chain_prune_distill_eval_export(tiny_ldm_dir, tmp_path):
    report = run_prune(str(tiny_ldm_dir), 0.5, tmp_path / "pruned", device="cpu")
    assert report["latent"] and report["params"][1] < report["params"][0]
    assert (tmp_path / "pruned" / "vqvae" / "config.json").is_file()
    run_distill(str(tmp_path / "pruned"), tmp_path / "student", loss="place", data="digits", steps=2, batch_size=4,
            checkpoint_every=0, device="cpu", show_progress=False, latent_cache=tmp_path / "cache")
    result = run_eval([str(tiny_ldm_dir), str(tmp_path / "student")], sampler_steps=2, grid_size=2,
                      latency_batch_size=2, output=tmp_path / "eval", device="cpu")
    assert all(r["latent"] and "guidance_scale" not in r for r in result["models"])
    run_export(str(tmp_path / "student"), tmp_path / "export")
    pipe = LDMPipeline.from_pretrained(tmp_path / "export")
    # Only the denoiser changed; the autoencoder is the teacher's, bit for bit.
    teacher_vq = load_model(str(tiny_ldm_dir)).autoencoder.model.state_dict()
    assert all(torch.equal(v, pipe.vqvae.state_dict()[k]) for k, v in teacher_vq.items())
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("damage", ["folder", "weights"])
def test_latent_pipeline_without_its_vae_is_a_clear_error(tiny_dit_dir, tmp_path, run_cli, damage):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dit_dir, broken)
    if damage == "folder":
        shutil.rmtree(broken / "vae")
    else:
        (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="latent pipeline"):
        load_model(str(broken))
    code, _, err = run_cli("prune", broken, "-o", tmp_path / "out", "--ratio", "0.5", "--device", "cpu")
    assert "vae" in assert_one_line_error(code, err, 1)


def test_cache_publishing_replaces_debris_and_keeps_a_finished_cache(tiny_dit_dir, tmp_path, monkeypatch):
    """Whatever an interrupted or foreign writer left where the cache belongs is replaced
    (under the cache's lock); a finished cache is read, never rewritten."""
    loaded = load_model(str(tiny_dit_dir))
    data = builtin_data("digits", 16, 3)
    _, report = cached_latents(data, loaded.autoencoder, image_size=16, cache_root=tmp_path, show_progress=False)
    folder = Path(report["folder"])
    shutil.rmtree(folder)
    folder.write_text("stray file")  # debris where the cache belongs
    (folder.parent / f".{folder.name}.tmp-dead").mkdir()  # a killed writer's temporary folder
    calls = []
    real_encode = Autoencoder.encode
    monkeypatch.setattr(Autoencoder, "encode", lambda self, x: calls.append(len(x)) or real_encode(self, x))
    latents, report = cached_latents(data, loaded.autoencoder, image_size=16, cache_root=tmp_path,
                                     show_progress=False)
    assert not report["reused"] and sum(calls) == 1797 and len(latents) == 1797
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
    calls.clear()
    _, report = cached_latents(data, loaded.autoencoder, image_size=16, cache_root=tmp_path, show_progress=False)
    assert report["reused"] and calls == []


def test_interrupted_encoding_leaves_nothing_behind(tiny_dit_dir, tmp_path, monkeypatch):
    loaded = load_model(str(tiny_dit_dir))

    def interrupted(self, images):
        raise KeyboardInterrupt

    monkeypatch.setattr(Autoencoder, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cached_latents(builtin_data("digits", 16, 3), loaded.autoencoder, image_size=16, cache_root=tmp_path,
                       show_progress=False)
    assert list((tmp_path / "latents").iterdir()) == []


def _cut_short(path: Path) -> None:
    """What a crash or a full disk mid-write leaves: the file's first part only."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_cache_shard_cut_short_is_rebuilt_with_one_warning(tiny_dit_dir, tmp_path, capsys):
    loaded = load_model(str(tiny_dit_dir))
    data = builtin_data("digits", 16, 3)
    first, report = cached_latents(data, loaded.autoencoder, image_size=16, cache_root=tmp_path, show_progress=False)
    folder = Path(report["folder"])
    assert json.loads((folder / "index.json").read_text())["files"]["shard-00000.safetensors"] > 0
    _cut_short(folder / "shard-00000.safetensors")
    capsys.readouterr()
    again, report = cached_latents(data, loaded.autoencoder, image_size=16, cache_root=tmp_path, show_progress=False)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "shard-00000.safetensors is" in err and "rebuilding" in err, err
    assert not report["reused"] and torch.equal(first.images, again.images)
    _, report = cached_latents(data, loaded.autoencoder, image_size=16, cache_root=tmp_path, show_progress=False)
    assert report["reused"] and capsys.readouterr().err == ""
