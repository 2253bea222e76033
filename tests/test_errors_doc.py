"""Runs every row of docs/errors.md: the documented command fails with the documented code and text."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("command, code, text", _rows(), ids=lambda v: str(v)[:40])
def test_documented_error(command, code, text, tmp_path, capsys):
    values = _placeholders(tmp_path)
    if "{window_hybrid_student}" in command:  # built only for the row that needs it
        from conftest import tiny_teacher

        import adala

        values["window_hybrid_student"] = str(adala.save_model(adala.linearize(tiny_teacher(), "window-hybrid"),
                                                               tmp_path / "window_hybrid"))
    argv = shlex.split(command.format(**values))
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert text in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
