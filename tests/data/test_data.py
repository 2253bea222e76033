"""Data sources: bundled photos, Fashion-MNIST (+ segmentation canvases), folders, WebDataset shards."""

from __future__ import annotations

import io
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from adala.data import SPEC_FORMS, build_dataset, describe, load_photo, photo_names
from adala.data import fashion_mnist as fm
from adala.data.photos import pool_sources
from adala.errors import DataError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
KW = dict(mean=MEAN, std=STD)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small per-item ops are much slower with intra-op threads on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


# ---------------------------------------------------------------- photos
def test_bundled_photos_are_real_and_offline():
    names = photo_names()
    assert len(names) >= 10
    assert {"astronaut", "coffee", "china", "grace_hopper"} <= set(names)
    im = load_photo("astronaut")
    assert im.mode == "RGB" and im.size == (512, 512)
    grey = load_photo("camera")
    assert grey.mode == "RGB"
    a = np.asarray(grey)
    assert (a[..., 0] == a[..., 2]).all()  # replicated grey
    with pytest.raises(DataError):
        load_photo("no-such-photo")


def test_photos_items_shape_stats_and_determinism():
    ds = build_dataset("photos", task="unlabeled", img_size=40, **KW, length=64)
    assert len(ds) == 64
    assert ds.num_classes is None
    n = len(pool_sources("photos", False))  # train split: held-out sources excluded
    xs = torch.stack([ds[i] for i in range(2 * n)])
    assert xs.shape == (2 * n, 3, 40, 40) and xs.dtype == torch.float32
    assert torch.isfinite(xs).all()
    raw = unnormalize(xs)
    assert raw.min() >= -1e-4 and raw.max() <= 1 + 1e-4
    assert -1.0 < xs.mean() < 1.0 and 0.5 < xs.std() < 2.0
    assert torch.equal(ds[3], ds[3])
    again = build_dataset("photos", task="unlabeled", img_size=40, **KW, length=64)
    assert torch.equal(ds[3], again[3])
    other = build_dataset("photos", task="unlabeled", img_size=40, **KW, length=64, seed=1)
    assert not torch.equal(ds[3], other[3])
    assert not torch.equal(ds[0], ds[n])  # same photo, different random crop
    assert len(build_dataset("photos", task="unlabeled", img_size=40, **KW)) == 10_000


def test_photos_heldout_is_fixed_views():
    ds = build_dataset("photos", task="unlabeled", img_size=32, **KW, train=False)
    n = len(pool_sources("photos", True))
    assert len(ds) == 2 * n
    same = build_dataset("photos:heldout", task="unlabeled", img_size=32, **KW, seed=7, train=False)
    assert len(same) == 2 * n
    for i in (0, n + 1, 2 * n - 1):
        assert torch.equal(ds[i], same[i])  # no randomness at all
    assert not torch.equal(ds[0], ds[n])  # views 0 and 1 of photo 0 differ
    with pytest.raises(DataError, match="no labels"):
        build_dataset("photos", task="classification", img_size=32, **KW)


@pytest.mark.parametrize("size", [1, 7])
@pytest.mark.parametrize("train", [True, False])
def test_any_output_size(size, train):
    ds = build_dataset("photos", task="unlabeled", img_size=size, **KW, train=train, length=6)
    assert all(ds[i].shape == (3, size, size) and torch.isfinite(ds[i]).all() for i in range(6))


def test_dataloader_workers_match_single_process():
    ds = build_dataset("photos", task="unlabeled", img_size=24, **KW, length=8, seed=3)
    serial = torch.cat(list(DataLoader(ds, batch_size=4)))
    parallel = torch.cat(list(DataLoader(ds, batch_size=4, num_workers=2)))
    assert torch.equal(serial, parallel)


# ---------------------------------------------------------------- Fashion-MNIST
@pytest.fixture(scope="module")
def fashion_available():
    try:
        fm.load_arrays("test")
    except DataError as e:
        pytest.skip(str(e))


def test_fashion_mnist_test_split(fashion_available):
    ds = build_dataset("fashion-mnist:test", task="classification", img_size=32, **KW, train=False)
    assert len(ds) == 10_000
    assert ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
    assert isinstance(y, int) and 0 <= y <= 9
    # the spec's split wins over the argument
    explicit = build_dataset("fashion-mnist:test", task="classification", img_size=8, **KW, split="train")
    assert len(explicit) == 10_000


def test_fashion_mnist_subset_is_deterministic_and_balanced(fashion_available):
    kw = dict(task="classification", img_size=28, **KW, length=200)
    a = build_dataset("fashion-mnist", train=False, **kw)
    b = build_dataset("fashion-mnist", train=False, **kw)
    assert len(a) == 200 and a.split == "test"
    labels = [a[i][1] for i in range(200)]
    assert labels == [b[i][1] for i in range(200)]
    assert set(labels) == set(range(10)) and max(np.bincount(labels)) < 40
    assert torch.equal(a[17][0], b[17][0])
    t0 = build_dataset("fashion-mnist", train=True, seed=0, **kw)
    t1 = build_dataset("fashion-mnist", train=True, seed=1, **kw)
    assert t0.split == "train"
    assert torch.equal(t0[5][0], build_dataset("fashion-mnist", train=True, seed=0, **kw)[5][0])
    assert t0[5][1] == t1[5][1] and not torch.equal(t0[5][0], t1[5][0])  # same subset, other augmentation


def test_fashion_mnist_missing_gives_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("ADALA_FASHION_MNIST_DIR", str(tmp_path / "nothing"))
    monkeypatch.setenv("ADALA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")

    def offline(split):
        raise OSError("no network")

    monkeypatch.setattr(fm, "_download", offline)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        build_dataset("fashion-mnist", task="classification", img_size=28, **KW)
    assert "\n" not in str(err.value)


def test_fashion_mnist_seg_masks_follow_items(fashion_available):
    ds = build_dataset("fashion-mnist-seg:test", task="segmentation", img_size=56, **KW, train=False)
    assert len(ds) == 500 and ds.num_classes == 11 and ds.class_names[0] == "background"
    assert ds.class_names[1:] == fm.CLASS_NAMES
    xs, ms = zip(*(ds[i] for i in range(8)))
    m = torch.stack(ms)
    assert m.dtype == torch.long and m.shape == (8, 56, 56)
    assert set(m.unique().tolist()) <= set(range(11))
    assert (m == 0).any() and (m > 0).any()
    bright = unnormalize(torch.stack(xs)).mean(1)
    corr = np.corrcoef(bright.flatten().numpy(), (m > 0).flatten().float().numpy())[0, 1]
    assert corr > 0.8
    x0, m0 = ds[3]
    x1, m1 = build_dataset("fashion-mnist-seg:test", task="segmentation", img_size=56, **KW, train=False)[3]
    assert torch.equal(x0, x1) and torch.equal(m0, m1)
    x2, m2 = build_dataset("fashion-mnist-seg:test", task="segmentation", img_size=56, **KW, seed=5)[3]
    assert not torch.equal(m0, m2)


def test_fashion_mnist_seg_train_augments_image_and_mask_together(fashion_available):
    ds = build_dataset("fashion-mnist-seg", task="segmentation", img_size=48, **KW, length=12, seed=2)
    assert len(ds) == 12 and ds.split == "train"
    xs, ms = zip(*(ds[i] for i in range(12)))
    bright = unnormalize(torch.stack(xs)).mean(1)
    fg = (torch.stack(ms) > 0).float()
    corr = np.corrcoef(bright.flatten().numpy(), fg.flatten().numpy())[0, 1]
    assert corr > 0.6  # misaligned geometry would drop this towards 0
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 48, 48) and batch[1].shape == (4, 48, 48)
    with pytest.raises(DataError):
        build_dataset("fashion-mnist-seg", task="classification", img_size=48, **KW)


# ---------------------------------------------------------------- folders
def _small_photo(name: str, size=(64, 48)) -> Image.Image:
    return load_photo(name).resize(size)


def _jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_folder_classification(tmp_path):
    for cls, names in {"cat": ["chelsea", "astronaut"], "drink": ["coffee", "rocket", "china"]}.items():
        (tmp_path / cls / "sub").mkdir(parents=True)
        for k, name in enumerate(names):
            ext = "jpg" if k % 2 == 0 else "png"
            folder = tmp_path / cls / ("sub" if k == 2 else "")
            _small_photo(name).save(folder / f"{name}.{ext}")
    (tmp_path / "drink" / "notes.txt").write_text("not an image, ignored")
    ds = build_dataset(f"folder:{tmp_path}", task="classification", img_size=32, **KW, train=False)
    assert ds.class_names == ["cat", "drink"] and ds.num_classes == 2
    assert len(ds) == 5 and ds.skipped == []
    assert sorted(ds[i][1] for i in range(5)) == [0, 0, 1, 1, 1]
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
    aug = build_dataset(f"folder:{tmp_path}", task="classification", img_size=32, **KW, length=10)
    assert len(aug) == 10 and not torch.equal(aug[0][0], aug[5][0])  # wrapped around, new augmentation


def test_folder_unlabeled_recursive(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    _small_photo("coffee").save(tmp_path / "top.jpg")
    _small_photo("rocket").save(tmp_path / "a" / "mid.png")
    _small_photo("moon").save(tmp_path / "a" / "b" / "deep.JPEG")
    (tmp_path / ".hidden").mkdir()
    _small_photo("moon").save(tmp_path / ".hidden" / "x.png")
    ds = build_dataset(f"folder:{tmp_path}", task="unlabeled", img_size=24, **KW)
    assert len(ds) == 3 and ds.num_classes is None
    assert ds[2].shape == (3, 24, 24)


def test_folder_bad_files_are_skipped_with_reasons(tmp_path):
    good = _small_photo("astronaut", (80, 60))
    jpeg = _jpeg_bytes(good)
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG\n")
    Image.new("1", (10_000, 10_000)).save(tmp_path / "bomb.png")
    good.save(tmp_path / "good.jpg")
    Image.fromarray(np.full((20, 30), 65535, np.uint16)).save(tmp_path / "sixteen.png")
    good.convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgba = good.convert("RGBA")
    rgba.putalpha(0)
    rgba.save(tmp_path / "transparent.png")
    Image.new("RGB", (1, 1), (10, 200, 30)).save(tmp_path / "tiny.png")
    good.convert("P").save(tmp_path / "palette.gif")

    ds = build_dataset(f"folder:{tmp_path}", task="unlabeled", img_size=16, **KW, train=False)
    skipped = {p.split("/")[-1]: reason for p, reason in ds.skipped}
    assert set(skipped) == {"truncated.jpg", "empty.jpg", "text.jpg", "bomb.png"}
    assert "truncated" in skipped["truncated.jpg"]
    assert "empty" in skipped["empty.jpg"]
    assert "not an image" in skipped["text.jpg"]
    assert "bomb" in skipped["bomb.png"]
    assert all("\n" not in r for r in skipped.values())
    names = [p.name for p in ds.files]
    convertible = ["good.jpg", "sixteen.png", "cmyk.jpg", "transparent.png", "tiny.png", "palette.gif"]
    assert names == sorted(convertible)
    items = {name: ds[i] for i, name in enumerate(names)}
    assert all(x.shape == (3, 16, 16) and torch.isfinite(x).all() for x in items.values())
    white = torch.ones(3, 16, 16)
    assert torch.allclose(unnormalize(items["sixteen.png"]), white, atol=1e-3)  # 65535 -> 255
    assert torch.allclose(unnormalize(items["transparent.png"]), white, atol=1e-3)  # composited on white
    tiny = unnormalize(items["tiny.png"])
    assert torch.allclose(tiny[:, 0, 0], torch.tensor([10, 200, 30]) / 255, atol=2e-3)
    assert len(list(DataLoader(ds, batch_size=4))) == 2


def test_folder_file_broken_after_scan_falls_back(tmp_path):
    for name in ("chelsea", "coffee", "rocket"):
        _small_photo(name).save(tmp_path / f"{name}.png")
    ds = build_dataset(f"folder:{tmp_path}", task="unlabeled", img_size=16, **KW, train=False)
    assert len(ds) == 3
    (tmp_path / "chelsea.png").write_bytes(b"garbage")
    x = ds[0]  # chelsea is index 0; replaced by the next readable file (coffee, index 1)
    assert torch.equal(x, ds[1])
    assert ds.skipped and ds.skipped[0][0].endswith("chelsea.png") and "load time" in ds.skipped[0][1]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_dataset(f"folder:{tmp_path / 'missing'}", task="unlabeled", img_size=16, **KW)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        build_dataset(f"folder:{tmp_path / 'empty'}", task="unlabeled", img_size=16, **KW)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"\x89PNG nope")
    with pytest.raises(DataError, match="no images found"):
        build_dataset(f"folder:{tmp_path / 'bad'}", task="unlabeled", img_size=16, **KW)
    with pytest.raises(DataError, match="class sub-folders"):
        build_dataset(f"folder:{tmp_path / 'bad'}", task="classification", img_size=16, **KW)


def _seg_folder(root, *, classes=None):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name in ["astronaut", "coffee", "chelsea", "rocket", "moon"]:
        _small_photo(name, (32, 32)).save(root / "images" / f"{name}.jpg")
        mask = rng.integers(0, 3, size=(32, 32)).astype(np.uint8)
        mask[:4] = 255
        if name == "chelsea":
            continue  # missing mask
        if name == "rocket":
            mask = mask[:16]  # size mismatch
        if name == "moon":
            mask[10, 10] = 7  # out of range only when classes.txt says 3 classes
        Image.fromarray(mask, "L").save(root / "masks" / f"{name}.png")
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")


def test_folder_segmentation(tmp_path):
    _seg_folder(tmp_path)
    ds = build_dataset(f"folder:{tmp_path}", task="segmentation", img_size=32, **KW, train=False)
    reasons = {p.split("/")[-1]: r for p, r in ds.skipped}
    assert set(reasons) == {"chelsea.jpg", "rocket.jpg"}
    assert "missing mask" in reasons["chelsea.jpg"] and "size" in reasons["rocket.jpg"]
    assert len(ds) == 3 and ds.num_classes == 8  # max label 7 (moon) + 1
    x, m = ds[0]  # astronaut; S equals the file size, so the mask comes back unchanged
    expected = np.asarray(Image.open(tmp_path / "masks" / "astronaut.png")).astype(np.int64)
    assert m.dtype == torch.long and torch.equal(m, torch.from_numpy(expected))
    assert x.shape == (3, 32, 32)
    aug = build_dataset(f"folder:{tmp_path}", task="segmentation", img_size=24, **KW, seed=4)
    _, am = aug[1]
    assert am.shape == (24, 24) and set(am.unique().tolist()) <= {0, 1, 2, 7, 255}


def test_folder_segmentation_with_classes_txt(tmp_path):
    _seg_folder(tmp_path, classes=["sky", "ground", "thing"])
    ds = build_dataset(f"folder:{tmp_path}", task="segmentation", img_size=16, **KW, train=False)
    assert ds.class_names == ["sky", "ground", "thing"] and ds.num_classes == 3
    reasons = {p.split("/")[-1]: r for p, r in ds.skipped}
    assert "outside" in reasons["moon.jpg"] and len(ds) == 2  # astronaut, coffee
    unl = build_dataset(f"folder:{tmp_path}", task="unlabeled", img_size=16, **KW)
    assert len(unl) == 5  # images/ only: the masks are not mistaken for photos


# ---------------------------------------------------------------- WebDataset shards
def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_wds_round_trip(tmp_path):
    names = photo_names()[:6]
    written = {}
    for s in range(2):
        samples = []
        for k in range(3):
            name = names[3 * s + k]
            key = f"s{s}_{k}"
            written[key] = 3 * s + k
            samples.append((key, {"jpg": _jpeg_bytes(_small_photo(name)), "cls": str(3 * s + k).encode()}))
        if s == 1:
            samples.append(("broken", {"jpg": b"not a jpeg", "cls": b"0"}))
        _write_shard(tmp_path / f"shard-{s:06d}.tar", samples)
    (tmp_path / "classes.txt").write_text("\n".join(f"c{k}" for k in range(6)))
    spec = f"wds:{tmp_path}/shard-{{000000..000001}}.tar"
    ds = build_dataset(spec, task="classification", img_size=32, **KW, train=False)
    assert isinstance(ds, torch.utils.data.IterableDataset) and ds.num_classes == 6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(ds)
    # no webdataset warning noise (its ResourceWarnings about tar handles aside): the skip is recorded instead
    assert not [w for w in caught if issubclass(w.category, UserWarning)]
    assert len(ds.skipped) == 1 and "broken" in str(ds.skipped[0])
    assert sorted(y for _, y in items) == list(range(6))
    assert all(x.shape == (3, 32, 32) and torch.isfinite(x).all() for x, _ in items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = list(build_dataset(spec, task="classification", img_size=32, **KW, train=False))
        unl = list(build_dataset(spec, task="unlabeled", img_size=32, **KW, seed=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(items, again))
    assert len(unl) == 6 and unl[0].shape == (3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = DataLoader(ds, batch_size=None, num_workers=2)  # one shard per worker
        assert sorted(int(y) for _, y in loader) == list(range(6))
    with pytest.raises(DataError, match="not found"):
        build_dataset(f"wds:{tmp_path}/nope-{{0..1}}.tar", task="unlabeled", img_size=32, **KW)


# ---------------------------------------------------------------- specs
@pytest.mark.parametrize("spec", ["imagenet", "photos:bogus", "fashion-mnist:val", "folder:", "", "wds:"])
def test_bad_specs(spec):
    with pytest.raises(DataError):
        build_dataset(spec, task="unlabeled", img_size=32, **KW)


def test_unknown_spec_lists_accepted_forms():
    with pytest.raises(DataError) as err:
        build_dataset("imagenet-1k", task="classification", img_size=32, **KW)
    assert SPEC_FORMS in str(err.value)
    with pytest.raises(DataError, match="unknown task"):
        build_dataset("photos", task="detection", img_size=32, **KW)
    with pytest.raises(DataError, match="img_size"):
        build_dataset("photos", task="unlabeled", img_size=0, **KW)


def test_describe():
    assert describe("photos").startswith(f"photos: {len(pool_sources('photos', False))} ")
    assert "missing" in describe("folder:/definitely/not/here")


# ---------------------------------------------------------------- large segmentation canvases and digits
def test_large_seg_canvases_have_many_items():
    small = build_dataset("fashion-mnist-seg:test", task="segmentation", img_size=84, **KW, train=False, length=8)
    large = build_dataset("fashion-mnist-seg-large:test", task="segmentation", img_size=448, **KW, train=False,
                          length=8)
    img, mask = large.canvas(0)
    assert img.shape == mask.shape == (224, 224)
    items = [large.canvas(i)[1] for i in range(8)]
    # 16-32 items per canvas: far more labelled pixels (and classes) than the 2-4 of the 84² canvases
    assert min(len(m[m > 0]) for m in items) > 4 * max(len(small.canvas(i)[1][small.canvas(i)[1] > 0])
                                                         for i in range(8)) / 2
    x, m = large[0]
    assert x.shape == (3, 448, 448) and m.shape == (448, 448) and len(m.unique()) >= 6


def test_sklearn_digits_split_and_labels():
    tr = build_dataset("digits:train", task="classification", img_size=56, **KW, train=False)
    te = build_dataset("digits:test", task="classification", img_size=56, **KW, train=False)
    assert (len(tr), len(te)) == (1200, 597) and tr.num_classes == 10
    x, y = te[0]
    assert x.shape == (3, 56, 56) and 0 <= y < 10
    assert {te[i][1] for i in range(60)} == set(range(10))
