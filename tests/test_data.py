"""Tests for difcompress.data: image datasets and the resumable BatchStream."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image

from difcompress.core.errors import UserError
from difcompress.data.datasets import (
    HFDataset,
    ImageFolderDataset,
    TensorImageDataset,
    open_image_data,
)
from difcompress.data.stream import BatchStream

# ----------------------------------------------------------------------------- helpers


def _make_folder(root):
    """7 readable images of assorted modes/sizes, plus 2 files that must be skipped."""
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(root / "red.png")
    Image.new("RGBA", (50, 30), (0, 255, 0, 128)).save(root / "a" / "rgba.png")
    Image.new("L", (20, 33), 255).save(root / "a" / "deep" / "gray.bmp")
    Image.new("RGB", (64, 48), (0, 0, 255)).save(root / "b" / "blue.JPG")
    Image.new("P", (17, 25), 3).save(root / "b" / "pal.gif")
    Image.new("RGB", (16, 16), (10, 20, 30)).save(root / "b" / "small.webp")
    Image.new("I;16", (24, 24)).save(root / "b" / "deep16.tiff")
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")


class IndexDataset(torch.utils.data.Dataset):
    """Item i is tensor([i]); counts loads so caching can be checked."""

    def __init__(self, n):
        self.n = n
        self.loads = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.loads += 1
        return torch.tensor([float(i)])


def _ids(batch):
    return [int(v) for v in batch.reshape(batch.shape[0], -1)[:, 0].tolist()]


def _dataset(kind, n):
    if kind == "tensor":
        return TensorImageDataset(torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1))
    return IndexDataset(n)


KINDS = ["tensor", "items"]

# ----------------------------------------------------------------------------- folders


def test_image_folder_finds_nested_skips_and_counts(tmp_path):
    _make_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, size=16, channels=3)
    assert len(ds) == 7
    assert [p.name for p in ds.scan.unreadable] == ["broken.png"]  # an image file PIL cannot read
    assert [p.name for p in ds.scan.other] == ["notes.txt"]
    assert "skipped 1 unreadable image(s)" in ds.scan.unreadable_note()
    rel = [p.relative_to(tmp_path).as_posix() for p in ds.paths]
    assert rel == sorted(rel)
    assert "a/deep/gray.bmp" in rel and "b/blue.JPG" in rel
    for i in range(len(ds)):
        x = ds[i]
        assert x.dtype == torch.float32
        assert x.shape == (3, 16, 16)
        assert x.min() >= -1.0 and x.max() <= 1.0


def test_image_folder_grayscale_channels(tmp_path):
    _make_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, size=8, channels=1)
    for i in range(len(ds)):
        assert ds[i].shape == (1, 8, 8)
    gray = ds[ds.paths.index(tmp_path / "a" / "deep" / "gray.bmp")]
    assert torch.allclose(gray, torch.ones_like(gray))


def test_image_values_scaled_to_minus_one_one(tmp_path):
    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "red.png")
    x = ImageFolderDataset(tmp_path, size=16, channels=3)[0]
    assert torch.allclose(x[0], torch.ones(16, 16))
    assert torch.allclose(x[1:], -torch.ones(2, 16, 16))


def test_resize_shorter_side_then_center_crop(tmp_path):
    # 128x64: white 32-px bands left and right, white 16-px stripe on top, black elsewhere.
    # Shorter side -> 16 gives 32x16 (top 4 rows white); the centre crop drops the side
    # bands. Squashing would keep white side columns; cropping without resizing would
    # lose the top stripe.
    img = Image.new("L", (128, 64), 0)
    img.paste(255, (0, 0, 32, 64))
    img.paste(255, (96, 0, 128, 64))
    img.paste(255, (0, 0, 128, 16))
    img.save(tmp_path / "bands.png")
    x = ImageFolderDataset(tmp_path, size=16, channels=1)[0]
    assert x.shape == (1, 16, 16)
    assert x[0, :3].min() > 0.9  # the top stripe, scaled down to ~4 rows
    assert x[0, 6:].max() < 0  # no side bands
    assert x[0, 6:, 1:-1].max() < -0.99  # bicubic may bleed a little into the edge columns


def test_empty_folder_raises(tmp_path):
    with pytest.raises(UserError, match="no images found"):
        ImageFolderDataset(tmp_path, 16, 3)
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=r"1 other files skipped"):
        open_image_data(tmp_path, 16, 3)


def test_missing_path_raises(tmp_path):
    with pytest.raises(UserError, match="data not found"):
        open_image_data(tmp_path / "nope", 16, 3)
    with pytest.raises(UserError):
        ImageFolderDataset(tmp_path / "nope", 16, 3)
    f = tmp_path / "one.png"
    Image.new("RGB", (4, 4)).save(f)
    with pytest.raises(UserError):
        open_image_data(f, 16, 3)


def test_bad_size_or_channels_raise(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    with pytest.raises(UserError):
        open_image_data(tmp_path, 0, 3)
    with pytest.raises(UserError):
        open_image_data(tmp_path, 16, 4)


def test_open_image_data_folder(tmp_path):
    _make_folder(tmp_path)
    ds = open_image_data(str(tmp_path), 16, 3)
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 7


# ----------------------------------------------------------------------------- HF datasets


def _hf_dataset(n, column="image", with_feature=True, mode="RGB"):
    datasets = pytest.importorskip("datasets")
    imgs = [
        Image.new(mode, (20 + i, 12), (i * 40) if mode == "L" else (i * 40, 0, 0))
        for i in range(n)
    ]
    data = {column: imgs, "label": list(range(n))}
    if with_feature:
        features = datasets.Features({column: datasets.Image(), "label": datasets.Value("int64")})
        return datasets.Dataset.from_dict(data, features=features)
    return datasets.Dataset.from_dict({"text": [str(i) for i in range(n)], "label": list(range(n))})


def test_hf_save_to_disk_roundtrip(tmp_path):
    _hf_dataset(3).save_to_disk(str(tmp_path / "hf"))
    ds = open_image_data(tmp_path / "hf", 8, 3)
    assert isinstance(ds, HFDataset)
    assert len(ds) == 3 and ds.column == "image"
    for i in range(3):
        x = ds[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert torch.allclose(x[0], torch.full((8, 8), i * 40 / 127.5 - 1), atol=1e-6)
    gray = HFDataset(tmp_path / "hf", 8, 1)
    assert gray[0].shape == (1, 8, 8)


def test_hf_picks_image_feature_column_by_type(tmp_path):
    _hf_dataset(2, column="pixels", mode="L").save_to_disk(str(tmp_path / "hf"))
    ds = HFDataset(tmp_path / "hf", 8, 1)
    assert ds.column == "pixels"
    assert ds[1].shape == (1, 8, 8)


def test_hf_dataset_dict_uses_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"test": _hf_dataset(2), "train": _hf_dataset(4)})
    dd.save_to_disk(str(tmp_path / "dd"))
    ds = open_image_data(tmp_path / "dd", 8, 3)
    assert isinstance(ds, HFDataset)
    assert ds.split == "train" and len(ds) == 4
    only = datasets.DatasetDict({"validation": _hf_dataset(2)})
    only.save_to_disk(str(tmp_path / "only"))
    ds2 = open_image_data(tmp_path / "only", 8, 3)
    assert ds2.split == "validation" and len(ds2) == 2


def test_hf_without_image_column_raises(tmp_path):
    _hf_dataset(2, with_feature=False).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(UserError, match="no image column"):
        open_image_data(tmp_path / "hf", 8, 3)


def test_hf_missing_datasets_package_raises(tmp_path, monkeypatch):
    _hf_dataset(1).save_to_disk(str(tmp_path / "hf"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(UserError, match="pip install datasets"):
        open_image_data(tmp_path / "hf", 8, 3)


# ----------------------------------------------------------------------------- BatchStream


def _take(stream, k):
    return [_ids(stream.next_batch()) for _ in range(k)]


@pytest.mark.parametrize("kind", KINDS)
def test_stream_same_seed_same_batches_different_seed_differs(kind):
    a = _take(BatchStream(_dataset(kind, 20), 4, seed=1), 12)
    torch.manual_seed(123)  # the global RNG must not matter
    b = _take(BatchStream(_dataset(kind, 20), 4, seed=1), 12)
    c = _take(BatchStream(_dataset(kind, 20), 4, seed=2), 12)
    assert a == b
    assert a != c


def test_stream_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _take(BatchStream(_dataset("items", 10), 3, seed=5), 7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_stream_exact_resume(kind):
    s = BatchStream(_dataset(kind, 11), 3, seed=7)
    _take(s, 5)  # crosses the epoch boundary (3 batches per epoch)
    state = s.state_dict()
    assert all(type(v) is int for v in state.values())
    assert {"epoch", "position", "seed", "batch_size"} <= set(state)
    expected = _take(s, 3)
    r = BatchStream(_dataset(kind, 11), 3, seed=999)
    r.load_state_dict(state)
    assert _take(r, 3) == expected
    fresh = BatchStream(_dataset(kind, 11), 3, seed=7)
    assert _take(fresh, 8)[5:] == expected


def test_stream_resume_rejects_changed_data():
    s = BatchStream(_dataset("items", 10), 3)
    _take(s, 2)
    with pytest.raises(UserError, match="data changed"):
        BatchStream(_dataset("items", 12), 3).load_state_dict(s.state_dict())


@pytest.mark.parametrize("n,bs", [(12, 4), (10, 3)])
def test_stream_epoch_covers_each_item_once(n, bs):
    s = BatchStream(_dataset("items", n), bs, seed=3)
    per_epoch = n // bs
    for _ in range(3):
        ids = sum(_take(s, per_epoch), [])
        assert len(ids) == per_epoch * bs
        assert len(set(ids)) == len(ids)  # no repeats within an epoch
        assert set(ids) <= set(range(n))
        if n % bs == 0:
            assert sorted(ids) == list(range(n))
    # epochs are reshuffled, not the same order every time
    s2 = BatchStream(_dataset("items", n), bs, seed=3)
    assert sum(_take(s2, per_epoch), []) != sum(_take(s2, per_epoch), [])


@pytest.mark.parametrize("kind", KINDS)
def test_row_slices_of_the_global_batch_make_up_the_whole_batch(kind):
    """Processes and accumulation micro-batches each take their rows of one global batch."""
    full = _take(BatchStream(_dataset(kind, 14), 4, seed=11), 6)
    halves = [BatchStream(_dataset(kind, 14), 4, seed=11) for _ in range(2)]
    rows = [slice(0, 2), slice(2, 4)]
    for expected in full:
        got = [_ids(s.next_with_conditions(r)[0]) for s, r in zip(halves, rows)]
        assert got[0] + got[1] == expected
    assert halves[0].state_dict() == halves[1].state_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_loader_gives_the_same_batches_and_resumes_exactly(tmp_path, workers):
    """Decoding in DataLoader workers changes nothing about which items come when."""
    _make_folder(tmp_path)
    expected_stream = BatchStream(ImageFolderDataset(tmp_path, 8, 3), 3, seed=2)
    expected = [expected_stream.next_batch() for _ in range(5)]
    stream = BatchStream(ImageFolderDataset(tmp_path, 8, 3), 3, seed=2)
    if workers:
        batches = stream.loader(slice(None), workers)
        got = [next(batches)[0] for _ in range(3)]
    else:
        got = [stream.next_batch() for _ in range(3)]
    state = stream.state_dict()
    resumed = BatchStream(ImageFolderDataset(tmp_path, 8, 3), 3, seed=0)
    resumed.load_state_dict(state)
    got += [next(resumed.loader(slice(None), workers or 1))[0] for _ in range(1)] + [resumed.next_batch()]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("kind", KINDS)
def test_dataset_smaller_than_batch(kind):
    s = BatchStream(_dataset(kind, 3), 8, seed=0)
    batches = _take(s, 4)
    for b in batches:
        assert len(b) == 8
        assert set(b) == {0, 1, 2}
        assert all(b.count(i) in (2, 3) for i in range(3))
    assert len({tuple(b) for b in batches}) > 1  # reshuffled each epoch
    state = s.state_dict()
    nxt = _take(s, 2)
    r = BatchStream(_dataset(kind, 3), 8)
    r.load_state_dict(state)
    assert _take(r, 2) == nxt


def test_stream_caches_decoded_items():
    ds = IndexDataset(6)
    s = BatchStream(ds, 2, seed=0, cache=True)
    _take(s, 9)  # three epochs
    assert ds.loads == 6
    ds2 = IndexDataset(6)
    _take(BatchStream(ds2, 2, seed=0, cache=False), 9)
    assert ds2.loads == 18


def test_stream_over_image_folder(tmp_path):
    _make_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, 8, 3)
    s = BatchStream(ds, 3, seed=0)
    b = s.next_batch()
    assert b.shape == (3, 3, 8, 8) and b.dtype == torch.float32
    assert b.min() >= -1 and b.max() <= 1


def test_stream_bad_args():
    with pytest.raises(UserError):
        BatchStream(_dataset("items", 4), 0)
    with pytest.raises(UserError):
        BatchStream(_dataset("items", 0), 2)


def test_class_subfolders_give_labels_and_flat_folders_none(tmp_path):
    for cls in ("cat", "ant"):
        (tmp_path / "classes" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / "classes" / cls / f"{i}.png")
    ds = ImageFolderDataset(tmp_path / "classes", 8, 3)
    assert ds.class_names == ["ant", "cat"] and ds.labels.tolist() == [0, 0, 1, 1]
    images, conditions = BatchStream(ds, 4, seed=0, conditions={"class_labels": ds.labels}).next_with_conditions()
    assert images.shape == (4, 3, 8, 8) and sorted(conditions["class_labels"].tolist()) == [0, 0, 1, 1]

    (tmp_path / "classes" / ".ipynb_checkpoints").mkdir()  # hidden: neither a class nor data
    Image.new("RGB", (8, 8)).save(tmp_path / "classes" / ".ipynb_checkpoints" / "x.png")
    (tmp_path / "classes" / "__MACOSX").mkdir()  # archive debris: not a class
    Image.new("RGB", (8, 8)).save(tmp_path / "classes" / "__MACOSX" / "._x.png")
    (tmp_path / "classes" / "notes").mkdir()  # no images: not a class
    ds = ImageFolderDataset(tmp_path / "classes", 8, 3)
    assert ds.class_names == ["ant", "cat"] and len(ds) == 4

    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    assert ImageFolderDataset(tmp_path / "flat", 8, 3).labels is None


def test_an_imagefolder_tree_surveys_its_image_files_too(tmp_path):
    import json

    root = tmp_path / "tree"
    root.mkdir()
    Image.new("RGB", (16, 16)).save(root / "a.png")
    Image.new("RGBA", (8, 8)).save(root / "b.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "x"}) + "\n"
                                                 for n in ("a.png", "b.png")))
    survey = open_image_data(root, 16, 3).survey
    assert survey.converted == {"RGBA": 1} and survey.upscaled == 1
    with pytest.raises(UserError, match=r"b.png, 8x8\); the shorter side must be at least 16 px"):
        open_image_data(root, 64, 3)
