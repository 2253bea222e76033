"""Held out means held out: the photo pool is split by source image, and no training stage sees a held-out one."""

from __future__ import annotations

import pytest
import torch

import adala
from adala.data import build_dataset
from adala.data import photos as photos_mod
from adala.data.backgrounds import INSTALL_HINT as BG_HINT
from adala.data.backgrounds import PHOTOGRAPHS, background_files
from adala.data.photos import HELDOUT_PHOTOS, HELDOUT_WALLPAPERS, is_heldout, pool_sources
from adala.data.wallpapers import INSTALL_HINT, wallpaper_files
from adala.errors import DataError
from adala.stages import align_attention, align_features

KW = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def _have_wallpapers() -> bool:
    try:
        wallpaper_files()
    except DataError:
        return False
    return True


needs_wallpapers = pytest.mark.skipif(not _have_wallpapers(), reason=INSTALL_HINT)


def test_splits_are_disjoint_by_source():
    train = {n for n, _ in pool_sources("photos", False)}
    held = {n for n, _ in pool_sources("photos", True)}
    assert held == set(HELDOUT_PHOTOS) and not train & held and len(train) >= 10


@needs_wallpapers
def test_wallpapers_full_resolution_and_split():
    train = pool_sources("wallpapers", False)
    held = pool_sources("wallpapers", True)
    assert {n for n, _ in held} == set(HELDOUT_WALLPAPERS)
    assert not {n for n, _ in train} & set(HELDOUT_WALLPAPERS) and len(train) >= 20
    files = [p for _, p in train + held]
    assert len(set(files)) == len(files)
    # the largest file of each folder: real high-resolution content for 448²-1344² crops
    big = photos_mod._image_tensor(dict(held)["Path"])
    assert min(big.shape[-2:]) >= 1400
    ds = build_dataset("heldout", task="unlabeled", img_size=448, **KW, train=False)
    assert len(ds) == 2 * (len(HELDOUT_PHOTOS) + len(HELDOUT_WALLPAPERS)) and ds[0].shape == (3, 448, 448)
    with pytest.raises(DataError, match="evaluation set"):
        pool_sources("heldout", False)
    for spec in ("heldout", "photos:heldout", "wallpapers:heldout"):  # no training set is ever held out
        with pytest.raises(DataError, match="evaluation set"):
            build_dataset(spec, task="unlabeled", img_size=28, **KW, train=True)


def test_missing_wallpapers_fail_in_one_line_with_the_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("ADALA_WALLPAPERS", str(tmp_path))
    with pytest.raises(DataError, match="apt-get install plasma-workspace-wallpapers") as e:
        build_dataset("wallpapers", task="unlabeled", img_size=32, **KW)
    assert "\n" not in str(e.value)


def test_no_training_stage_ever_reads_a_heldout_source(monkeypatch, tmp_path):
    """Every image a stage-1 or stage-2 run decodes is recorded; a held-out source among them fails."""
    seen: list[str] = []
    real = photos_mod._image_tensor.__wrapped__

    def spy(path):
        seen.append(path.parent.parent.parent.name if "wallpapers" in str(path) else path.stem)
        return real(path)

    monkeypatch.setattr(photos_mod, "_image_tensor", spy)
    t = adala.load_teacher("timm:vit_small_patch14_dinov2", pretrained=False, img_size=56, depth=1, embed_dim=32,
                           num_heads=2)
    data = ["photos"] + (["wallpapers"] if _have_wallpapers() else [])
    data += ["backgrounds"] if _have_backgrounds() else []
    s1 = align_attention(t, data=data, img_size=28, steps=2, batch_size=4, lr=1e-3, out=tmp_path / "s1",
                         progress=False)
    align_features(t, s1.model, data=data, img_size=[28, 42], steps=2, batch_size=4, lr=1e-4,
                   out=tmp_path / "s2", progress=False)
    assert len(seen) >= 8
    names = {photos_mod._PHOTO_FILES[n][1].split("/")[-1].split(".")[0]: n for n in photos_mod._PHOTO_FILES}
    resolved = {names.get(s, s) for s in seen}
    assert not [n for n in resolved if is_heldout(n)], resolved
    # and the spy does see held-out sources when an evaluation asks for them (so the check can fail)
    seen.clear()
    build_dataset("photos:heldout", task="unlabeled", img_size=28, **KW, train=False)[0]
    assert any(is_heldout(names.get(s, s)) for s in seen)


def test_heldout_views_are_fixed():
    a = build_dataset("photos:heldout", task="unlabeled", img_size=32, **KW, train=False)
    b = build_dataset("photos", task="unlabeled", img_size=32, **KW, train=False, seed=5)
    assert len(a) == 2 * len(HELDOUT_PHOTOS)
    assert all(torch.equal(a[i], b[i]) for i in range(len(a)))
    assert not torch.equal(a[0], a[len(HELDOUT_PHOTOS)])  # view 0 and view 1 of the same photo


def _have_backgrounds() -> bool:
    try:
        background_files()
    except DataError:
        return False
    return True


@pytest.mark.skipif(not _have_backgrounds(), reason=BG_HINT)
def test_backgrounds_are_train_only_full_size_photographs_distinct_from_heldout():
    train = pool_sources("backgrounds", False)
    assert len(train) == len(PHOTOGRAPHS)  # make data installs all three packages
    with pytest.raises(DataError, match="train-only"):
        pool_sources("backgrounds", True)
    with pytest.raises(DataError, match="unknown data spec"):
        build_dataset("backgrounds:heldout", task="unlabeled", img_size=28, **KW)
    ds = build_dataset("backgrounds", task="unlabeled", img_size=448, **KW, length=4)
    assert ds[0].shape == (3, 448, 448)
    big = photos_mod._image_tensor(dict(train)["kleiber"])
    assert min(big.shape[-2:]) == 1600  # 6028x3391 kept at the pool's 1600 px short side, not a thumbnail
    # no held-out source hides among them under another name (same pixels)
    held = [photos_mod._image_tensor(p) for _, p in pool_sources("photos", True) + pool_sources("wallpapers", True)]
    sigs = {tuple(h.shape) + (int(h.float().mean() * 1000),) for h in held}
    for _, p in train:
        t = photos_mod._image_tensor(p)
        assert tuple(t.shape) + (int(t.float().mean() * 1000),) not in sigs


def test_missing_backgrounds_fail_in_one_line_with_the_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("ADALA_BACKGROUNDS", str(tmp_path))
    with pytest.raises(DataError, match="apt-get install lomiri-wallpapers-16.04") as e:
        build_dataset("backgrounds", task="unlabeled", img_size=32, **KW)
    assert "\n" not in str(e.value)
