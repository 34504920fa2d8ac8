"""Metrics and plots, without Inception weights: a tiny deterministic extractor stands in."""

from __future__ import annotations

import json
import urllib.request
import warnings

import numpy as np
import pytest
import torch
from cleanfid.resize import make_resizer
from PIL import Image

from difcompress.core.errors import UserError
from difcompress.metrics import extractors as metrics
from difcompress.metrics.cost import LiveStorageBytes, count_macs
from difcompress.metrics.extractors import (
    INCEPTION_URL,
    features_of_folder,
    features_of_images,
    get_feature_extractor,
    inception_extractor,
    register_feature_extractor,
)
from difcompress.metrics.fid import (
    fid_kid,
    load_reference,
    read_reference_stats,
    save_reference_stats,
)
from difcompress.reports.plots import plot_metrics, save_sample_grid


class FakeExtractor:
    """4x4 mean-pooled pixels through a fixed random projection; records what it was fed."""

    def __init__(self, name: str = "fake", input_size: int | None = 16, dim: int = 8):
        self.name = name
        self.input_size = input_size
        self.device = torch.device("cpu")
        g = torch.Generator().manual_seed(1234)
        self.proj = torch.randn(3 * 16, dim, generator=g)
        self.seen: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append((tuple(images.shape), images.dtype))
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)
        return x @ self.proj


def _fake_factory(*, weights_path=None, device=torch.device("cpu")):
    return FakeExtractor()


register_feature_extractor("fake-test", _fake_factory, replace=True)


def _images(n: int = 64, seed: int = 0, size: int = 8, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# ---------------------------------------------------------------- registry / inception loading


def test_registry_builds_registered_and_refuses_unknown():
    ex = get_feature_extractor("fake-test", weights_path=None, device="cpu")
    assert isinstance(ex, FakeExtractor)
    assert isinstance(ex, metrics.FeatureExtractor)
    assert "inception" in metrics.known_feature_extractors()
    with pytest.raises(UserError) as e:
        get_feature_extractor("no-such-net", weights_path=None, device="cpu")
    assert "inception" in str(e.value) and "fake-test" in str(e.value)


def test_inception_missing_everywhere_says_where_to_get_it(monkeypatch, tmp_path):
    monkeypatch.delenv(metrics.INCEPTION_ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(metrics, "CLEANFID_CACHE_DIR", str(tmp_path / "cache"))
    assert INCEPTION_URL.startswith("https://") and INCEPTION_URL.endswith("inception-2015-12-05.pt")
    with pytest.raises(UserError) as e:
        inception_extractor(None, torch.device("cpu"))
    msg = str(e.value)
    assert INCEPTION_URL in msg and "--inception" in msg and "\n" not in msg
    with pytest.raises(UserError) as e:  # through the registry too
        get_feature_extractor("inception", weights_path=None, device="cpu")
    assert INCEPTION_URL in str(e.value)
    with pytest.raises(UserError) as e:  # an explicit path that does not exist
        inception_extractor(tmp_path / "nope.pt", torch.device("cpu"))
    assert "nope.pt" in str(e.value) and INCEPTION_URL in str(e.value)


class _FakeInceptionNet(torch.nn.Module):
    """Shaped like clean-fid's TorchScript: a `.layers` trunk returning [N, 2048, 1, 1]."""

    def __init__(self, bias: float):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(3, 2048, 1))
        with torch.no_grad():
            self.layers[1].weight.fill_(1.0)
            self.layers[1].bias.fill_(bias)

    def forward(self, x):
        return self.layers(x)


def _save_fake_inception(path, bias: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_FakeInceptionNet(bias)).save(str(path))


def test_inception_resolution_order_and_clean_input(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(metrics, "CLEANFID_CACHE_DIR", str(cache))
    monkeypatch.delenv(metrics.INCEPTION_ENV_VAR, raising=False)
    _save_fake_inception(cache / metrics.INCEPTION_FILENAME, bias=3.0)
    _save_fake_inception(tmp_path / "env.pt", bias=2.0)
    _save_fake_inception(tmp_path / "explicit.pt", bias=1.0)
    black = -torch.ones(2, 1, 8, 8)  # uint8 0 -> (0 - 128) / 128 = -1 per channel -> sum -3

    def first(ex):
        return float(features_of_images(black, ex)[0, 0])

    ex = inception_extractor(None, torch.device("cpu"))  # clean-fid's cache
    assert ex.name == "inception" and ex.input_size == 299
    assert first(ex) == pytest.approx(-3.0 + 3.0, abs=1e-4)
    monkeypatch.setenv(metrics.INCEPTION_ENV_VAR, str(tmp_path / "env.pt"))
    assert first(inception_extractor(None, torch.device("cpu"))) == pytest.approx(-1.0, abs=1e-4)
    ex = inception_extractor(tmp_path / "explicit.pt", torch.device("cpu"))
    assert first(ex) == pytest.approx(-2.0, abs=1e-4)
    assert features_of_images(black, ex).shape == (2, 2048)

    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(UserError) as e:
        inception_extractor(bad, torch.device("cpu"))
    assert "--inception" in str(e.value)


# ---------------------------------------------------------------- features


def test_features_of_images_conversion_and_clean_resize():
    ex = FakeExtractor(input_size=16)
    imgs = _images(5, size=8)
    feats = features_of_images(imgs, ex, batch_size=2)
    assert feats.shape == (5, 8) and feats.dtype == np.float32
    assert [s for s, _ in ex.seen] == [(2, 3, 16, 16), (2, 3, 16, 16), (1, 3, 16, 16)]
    assert all(dt == torch.float32 for _, dt in ex.seen)  # clean resize is not re-quantized

    # Exactly clean-fid's "clean" resize of the rounded uint8 image.
    u8 = ((imgs[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    ref = make_resizer("PIL", False, "bicubic", (16, 16))(u8)
    resized = metrics.clean_resize(torch.from_numpy(u8).permute(2, 0, 1)[None], 16)[0]
    np.testing.assert_allclose(resized.permute(1, 2, 0).numpy(), ref, atol=1e-5)

    # Range: -1 -> 0, +1 -> 255, out of range clamps.
    x = torch.tensor([-1.0, 1.0, 3.0, -7.0, 0.0]).view(1, 1, 1, 5)
    assert metrics.to_uint8(x)[0, 0, 0].tolist() == [0, 255, 255, 0, 128]

    # Grayscale == the same image repeated over 3 channels; no resize when input_size is None.
    ex2 = FakeExtractor(input_size=None)
    gray = _images(4, seed=3, channels=1)
    np.testing.assert_allclose(
        features_of_images(gray, ex2), features_of_images(gray.repeat(1, 3, 1, 1), ex2), atol=1e-6
    )
    assert ex2.seen[0] == ((4, 3, 8, 8), torch.uint8)


def test_features_of_folder_matches_images(tmp_path):
    imgs = _images(6, seed=1)
    u8 = metrics.to_uint8(imgs)
    (tmp_path / "sub").mkdir()
    for i in range(6):
        # Relative-path order (img00..img03, sub/a04, sub/a05) differs from file-name order.
        name = f"sub/a{i:02d}.png" if i >= 4 else f"img{i:02d}.png"
        Image.fromarray(u8[i].permute(1, 2, 0).numpy()).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    ex = FakeExtractor(input_size=16)
    from_folder = features_of_folder(tmp_path, ex, batch_size=4)
    np.testing.assert_allclose(from_folder, features_of_images(imgs, ex), atol=1e-5)
    ex_none = FakeExtractor(input_size=None)
    np.testing.assert_allclose(
        features_of_folder(tmp_path, ex_none), features_of_images(imgs, ex_none), atol=1e-5
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError):
        features_of_folder(empty, ex)


# ---------------------------------------------------------------- FID / KID


def test_fid_kid_self_vs_shifted():
    ex = FakeExtractor()
    a = features_of_images(_images(64, seed=0), ex)
    b = features_of_images(_images(64, seed=1), ex)  # same distribution, other samples
    shifted = features_of_images((_images(64, seed=0) * 0.5 + 0.4).clamp(-1, 1), ex)

    same = fid_kid(a, a)
    near = fid_kid(a, b)
    far = fid_kid(a, shifted)
    assert set(same) == {"fid", "kid"} and all(isinstance(v, float) for v in same.values())
    assert abs(same["fid"]) < 1e-6
    assert far["fid"] > 10 * max(near["fid"], 1e-3) and far["fid"] > 0.1
    assert abs(same["kid"]) < 0.02 * far["kid"]
    assert far["kid"] > 10 * abs(near["kid"])
    # Reproducible and the global RNG is untouched.
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    first = fid_kid(a, b[:40])
    assert (np.random.get_state()[1] == before).all()
    np.random.rand(3)  # the global RNG moves on; KID subsets must not
    assert fid_kid(a, b[:40]) == first


def test_fid_kid_small_and_invalid_sets():
    rng = np.random.default_rng(0)
    tiny = fid_kid(rng.normal(size=(3, 8)), rng.normal(size=(5, 8)))  # subset clamped to 3
    assert np.isfinite(tiny["fid"]) and np.isfinite(tiny["kid"])
    with pytest.raises(UserError):
        fid_kid(rng.normal(size=(1, 8)), rng.normal(size=(5, 8)))
    with pytest.raises(UserError):
        fid_kid(rng.normal(size=(4, 8)), rng.normal(size=(4, 6)))


# ---------------------------------------------------------------- reference stats


def test_reference_stats_roundtrip_and_refusals(tmp_path):
    ex = FakeExtractor(name="fake")
    feats = features_of_images(_images(20), ex)
    path = save_reference_stats(tmp_path / "ref.npz", feats, {"extractor": "fake", "dataset": "x"})
    assert path == tmp_path / "ref.npz" and path.is_file()
    with np.load(path, allow_pickle=False) as z:  # plain arrays only, no pickles; clean-fid's keys
        np.testing.assert_allclose(z["mu"], feats.mean(0), rtol=1e-5, atol=1e-6)
        assert z["sigma"].shape == (8, 8)
    loaded = load_reference(path, ex)
    np.testing.assert_array_equal(loaded.feats, feats)
    assert loaded.extractor == "fake" and read_reference_stats(path).extractor == "fake"
    assert abs(fid_kid(features_of_images(_images(20), ex), loaded)["fid"]) < 1e-6

    with pytest.raises(UserError) as e:
        load_reference(path, FakeExtractor(name="other"))
    assert "fake" in str(e.value) and "other" in str(e.value)

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError):
        load_reference(corrupt, ex)
    with pytest.raises(UserError):
        load_reference(tmp_path / "missing.npz", ex)

    # A folder works as a reference too.
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(metrics.to_uint8(_images(3, seed=5))):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    assert load_reference(folder, ex).feats.shape == (3, 8)


def test_statistics_made_at_another_size_or_mode_are_refused(tmp_path):
    """A `stats --size 32` file against a model generating 16 px images names both sizes."""
    ex = FakeExtractor(name="fake")
    feats = features_of_images(_images(20), ex)
    at_32 = save_reference_stats(tmp_path / "ref32.npz", feats, {"extractor": "fake", "mode": "clean", "size": 32})
    assert load_reference(at_32, ex, image_size=32).protocol["size"] == 32
    with pytest.raises(UserError, match=r"32 px images \(stats --size 32\) but the model generates 16 px") as e:
        load_reference(at_32, ex, image_size=16)
    assert e.value.exit_code == 2
    legacy = save_reference_stats(tmp_path / "legacy.npz", feats, {"extractor": "fake", "mode": "legacy_pytorch"})
    with pytest.raises(UserError, match="legacy_pytorch"):
        load_reference(legacy, ex, image_size=16)
    unsized = save_reference_stats(tmp_path / "folder.npz", feats, {"extractor": "fake", "size": None})
    assert load_reference(unsized, ex, image_size=16).dim == 8  # a folder's images are each at their own size


def test_clean_fids_own_statistics_files_and_dataset_names_are_references(tmp_path, monkeypatch):
    """clean-fid's files hold mu and sigma (its Inception's): FID from them; KID when its
    _kid.npz companion sits beside it, else reported as unavailable."""
    from difcompress.metrics import fid as fid_module

    inception = FakeExtractor(name="inception")
    feats = features_of_images(_images(30), inception)
    stats = tmp_path / "stats"
    stats.mkdir()
    np.savez(stats / "cifar10_clean_train_32.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    monkeypatch.setattr(fid_module, "CLEANFID_STATS_DIR", stats)
    generated = features_of_images(_images(30, seed=9), inception)
    for spec in (stats / "cifar10_clean_train_32.npz", "cifar10-train-32"):
        reference = load_reference(spec, inception)
        numbers = fid_kid(generated, reference)
        assert numbers["kid"] is None
        assert numbers["fid"] == pytest.approx(fid_kid(generated, feats)["fid"], rel=1e-5)
    np.savez(stats / "cifar10_clean_train_32_kid.npz", feats=feats)
    assert fid_kid(generated, load_reference("cifar10-train-32", inception))["kid"] is not None
    with pytest.raises(UserError, match="not a clean-fid dataset name"):
        load_reference("lsun-cats-256", inception)
    with pytest.raises(UserError, match="'inception' features but the metric uses 'digits'"):
        load_reference("cifar10-train-32", FakeExtractor(name="digits"))


# ---------------------------------------------------------------- plots


def test_save_sample_grid_png(tmp_path):
    rows = [
        ("teacher", _images(4, seed=0)),
        ("pruned 30%", _images(4, seed=1, channels=1)),
        ("student", _images(3, seed=2)),
    ]
    out = save_sample_grid(tmp_path / "grid" / "samples.png", rows)
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG"
        w, h = im.size
    assert w >= 4 * 64 and h >= 3 * 64  # 8 px samples were upscaled
    with Image.open(save_sample_grid(tmp_path / "two.png", rows, ncols=2)) as im:
        assert 0 < im.size[0] < w
    with pytest.raises(UserError):
        save_sample_grid(tmp_path / "none.png", [])


def test_plot_metrics_png(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rng = np.random.default_rng(0)
    with open(log, "w") as f:
        for step in range(0, 300, 10):
            rec = {
                "step": step,
                "loss": float(1 / (1 + step) + 0.05 * rng.random()),
                "kd": float(rng.random()),
                "lr": 1e-4,
                "phase": "train",  # non-numeric: skipped
                "flag": True,  # bool: skipped
            }
            if step % 50 == 0:
                rec["fid"] = 100.0 - step / 10
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 300, "loss": 0.1')  # half-written last line
    out = plot_metrics(log, tmp_path / "plots" / "metrics.png")
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0
        w_all = im.size[0]
    with Image.open(plot_metrics(log, tmp_path / "one.png", keys=["loss", "missing"])) as im:
        assert 0 < im.size[0] < w_all  # one subplot instead of a 3-wide grid
    with pytest.raises(UserError):
        plot_metrics(log, tmp_path / "x.png", keys=["phase"])
    with pytest.raises(UserError):
        plot_metrics(tmp_path / "absent.jsonl", tmp_path / "y.png")


def _draws_first_two_colours(pixels: np.ndarray) -> bool:
    """matplotlib's C0 (blue) and C1 (orange) both appear among the RGB pixels."""
    return (np.abs(pixels - [31, 119, 180]).sum(1) < 30).any() and (np.abs(pixels - [255, 127, 14]).sum(1) < 30).any()


def test_plot_by_ratio_draws_one_line_per_objective(tmp_path):
    from difcompress.reports.plots import plot_by_ratio

    rows = [{"ratio": r, "loss": loss, "fid_mean": fid, "fid_std": 0.1, "seeds": 3}
            for r, loss, fid in (("0.9", "mse", 1.1), ("0.95", "mse", 3.0), ("0.9", "place", 1.4),
                                 ("0.95", "place", 2.5))]
    out = plot_by_ratio(rows, tmp_path / "fid.png", floor=0.25, title="test")
    with Image.open(out) as im:
        im.load()
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    # matplotlib's C0 (blue) and C1 (orange): both objectives are drawn
    assert _draws_first_two_colours(pixels)


def test_plot_runs_draws_every_key_and_run_and_skips_missing_values(tmp_path):
    from difcompress.reports.plots import plot_runs

    def log(w_end):
        return [{"step": s, "w": w_end * s / 300, "slope": 1.0, "intercept": 0.0} for s in range(10, 310, 10)] \
            + [{"step": 310, "task": 0.1}]  # a row without the keys leaves a gap, not an error

    curves = {"0.9-place-s0": log(0.9), "0.9-lift-s0": log(0.5)}
    with Image.open(plot_runs(curves, tmp_path / "one.png", ("w",))) as im:
        narrow = im.size[0]
    with Image.open(plot_runs(curves, tmp_path / "c.png", ("w", "slope", "intercept"), title="t")) as im:
        im.load()
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert im.size[0] > 2 * narrow  # one subplot per key
    assert _draws_first_two_colours(pixels)


class _Attention(torch.nn.Module):
    """Nothing but one scaled_dot_product_attention: its MACs are the two matmuls."""

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class _AttentionInputs:
    @staticmethod
    def example_inputs(model, batch):
        q, k, v = torch.randn(3, batch, 2, 16, 8).unbind(0)  # batch, heads, tokens, head dim
        return {"q": q, "k": k, "v": v}


def test_attention_matmuls_are_counted_on_cpu():
    # Q K^T and attention @ V: 2 heads x 16 x 16 x 8 each. torch's fused CPU kernel has no
    # FLOP formula, so before the count ran on the math kernel a CPU count was 0 here and a
    # CUDA count was not: every CPU-measured MACs figure left out attention.
    assert count_macs(_Attention(), _AttentionInputs()) == 2 * 2 * 16 * 16 * 8


def test_the_memory_tracker_counts_no_view_of_a_weight_as_an_allocation():
    with torch.device("meta"):
        layer, x = torch.nn.Linear(1000, 1000), torch.randn(1, 10, 1000)
    tracker = LiveStorageBytes([layer.weight, layer.bias, x])
    with torch.no_grad(), tracker:
        layer(x)
    assert tracker.peak == 10 * 1000 * 4  # the output alone, not the 4 MB weight its transpose views
