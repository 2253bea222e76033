"""A stage run over a folder full of bad images completes; the unreadable ones are counted in log.jsonl."""

from __future__ import annotations

import io
import json

import numpy as np
from conftest import tiny_teacher
from PIL import Image

import adala
from adala.stages import align_features


def _photo(size=(40, 30), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _bad_folder(root):
    root.mkdir()
    for i in range(4):
        _photo(seed=i).save(root / f"good{i}.jpg")
    buf = io.BytesIO()
    _photo(seed=9).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image at all")
    Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).save(root / "deep16.png")
    _photo(seed=3).convert("CMYK").save(root / "cmyk.jpg")
    _photo(seed=4).convert("RGBA").save(root / "rgba.png")
    _photo(size=(1, 1), seed=5).save(root / "one_pixel.png")
    return {"truncated.jpg", "empty.jpg", "text.jpg"}


def test_run_over_bad_images_completes_and_lists_them(tmp_path):
    unreadable = _bad_folder(tmp_path / "imgs")
    teacher = tiny_teacher(img_size=28)
    student = adala.linearize(teacher)
    res = align_features(teacher, student, data=f"folder:{tmp_path / 'imgs'}", img_size=28, steps=2, batch_size=2,
                         out=tmp_path / "s2", progress=False, log_every=1)
    assert res.metrics["steps"] == 2
    events = [json.loads(line) for line in (tmp_path / "s2" / "log.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e.get("event") == "skipped_images"]
    assert len(skipped) == 1
    listed = {f["path"].rsplit("/", 1)[-1] for f in skipped[0]["files"]}
    assert listed == unreadable and skipped[0]["count"] == 3
    assert all(f["reason"] for f in skipped[0]["files"])
