"""Runs every row of docs/errors.md: the documented command fails with the documented code and text."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import adala
from adala.cli import main

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
ROW = re.compile(r"^\| `adala ([^`]*)` \| (\d) \| ([^|]+) \| ([^|]+) \|$")


def _rows() -> list[tuple[str, int, str]]:
    rows = [(m[1], int(m[2]), m[3].strip()) for line in DOC.read_text().splitlines() if (m := ROW.match(line))]
    assert len(rows) >= 10, "docs/errors.md lost its table"
    return rows


def _placeholders(tmp: Path) -> dict[str, str]:
    """The bad inputs the table refers to, made fresh for each row."""
    empty = tmp / "empty"
    empty.mkdir()
    pickle = tmp / "weights.pth"
    torch.save({"w": torch.zeros(1)}, pickle)
    no_config = tmp / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("teacher: dinov2-s14\nstages:\n  s1: {kind: align-attention, stepz: 3}\n")
    return {"tmp": str(tmp), "empty": str(empty), "pickle": str(pickle), "no_config_dir": str(no_config),
            "bad_yaml": str(bad_yaml)}


class _Lazy(dict):
    """Placeholders that cost more than a file write (a saved model, a short training run) are made only
    for the rows that name them."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(_placeholders(tmp))
        self.tmp = tmp
        self.held: list = []  # run locks held for the row's duration

    def __missing__(self, key: str) -> str:
        value = str(getattr(self, f"_{key}")())
        self[key] = value
        return value

    def _tiny_teacher(self) -> Path:
        from conftest import tiny_teacher

        d = self.tmp / "tiny_teacher"
        adala.save_model(tiny_teacher(img_size=28), d)
        return d

    def _student(self) -> Path:
        d = self.tmp / "student"
        adala.save_model(adala.linearize(adala.load_model(self["tiny_teacher"])), d)
        return d

    def _user_dir(self) -> Path:
        d = self.tmp / "user_dir"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"the user's own model")
        return d

    def _locked(self) -> Path:
        from adala.outdir import OutLock

        d = self.tmp / "locked"
        d.mkdir()
        self.held.append(OutLock(d, "align-features").acquire())  # as a live run would hold it
        return d

    def _ckpt_run(self) -> Path:
        from adala.stages import align_attention

        d = self.tmp / "ckpt_run"
        align_attention(self["tiny_teacher"], self["student"], img_size=28, steps=1, batch_size=2, out=d,
                        progress=False)
        (d / "metrics.json").unlink()  # interrupted after its last checkpoint
        return d

    def _wrong_arch(self) -> Path:
        from conftest import tiny_teacher

        d = self.tmp / "wrong_arch"
        shutil.copytree(self["student"], d)
        other = self.tmp / "other_arch"
        adala.save_model(tiny_teacher(img_size=28, depth=3, embed_dim=32), other)
        for name in ("model.safetensors", "model.safetensors.sha256"):
            shutil.copy(other / name, d / name)
        return d

    def _bad_attention(self) -> Path:
        d = self.tmp / "bad_attention"
        shutil.copytree(self["student"], d)
        cfg = json.loads((d / "adala.json").read_text())
        cfg["attention"] = "linear-elu"
        (d / "adala.json").write_text(json.dumps(cfg))
        return d

    def _binary(self) -> Path:
        p = self.tmp / "model.safetensors"
        p.write_bytes(bytes(range(256)) * 4)
        return p

    def _dup_yaml(self) -> Path:
        p = self.tmp / "dup.yaml"
        p.write_text("teacher: dinov2-s14\nstages:\n  s1: {kind: align-attention}\n  s1: {kind: align-attention}\n")
        return p

    def _window_hybrid_student(self) -> Path:
        from conftest import tiny_teacher

        d = self.tmp / "window_hybrid"
        adala.save_model(adala.linearize(tiny_teacher(), "window-hybrid"), d)
        return d

    def _rgb_masks(self) -> Path:
        root = self.tmp / "seg"
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        rgb = np.zeros((32, 32, 3), dtype=np.uint8)
        Image.fromarray(rgb + 90).save(root / "images" / "a.png")
        Image.fromarray(rgb).save(root / "masks" / "a.png")
        return root


@pytest.mark.parametrize("command, code, text", _rows(), ids=lambda v: str(v)[:40])
def test_documented_error(command, code, text, tmp_path, capsys):
    values = _Lazy(tmp_path)
    argv = shlex.split(command.format_map(values))
    try:
        assert main(argv) == code
    finally:
        for lock in values.held:
            lock.release()
    err = capsys.readouterr().err.strip()
    assert text in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
