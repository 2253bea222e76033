"""``adala bench`` over several batch sizes, with the teacher left out above a size (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from adala.benchmark import bench
from adala.cli import main
from adala.cli.bench import format_table
from adala.errors import ConfigError

TINY = {"pretrained": False, "img_size": 56, "depth": 2, "embed_dim": 64, "num_heads": 2}
SPEC = "timm:vit_small_patch14_dinov2"


def test_bench_times_every_batch_size_and_skips_the_teacher_above_its_limit(one_thread):
    record = bench(SPEC, ["linear-elu"], [28, 56], batch_size=[1, 3], repeats=1, warmup=0, memory=False,
                   teacher_kwargs=TINY, teacher_max_resolution=28)
    assert record["settings"]["batch_sizes"] == [1, 3] and record["settings"]["batch_size"] == 1
    timed = {(r["batch_size"], r["resolution"], r["model"]) for r in record["results"]}
    assert timed == {(b, r, m) for b in (1, 3) for r in (28, 56) for m in ("teacher", "linear-elu")
                     if not (m == "teacher" and r == 56)}
    assert {(c["batch_size"], c["resolution"]) for c in record["comparisons"]} == {(1, 28), (3, 28)}
    assert [(s["model"], s["resolution"], s["batch_size"]) for s in record["skipped"]] == [
        ("teacher", 56, 1), ("teacher", 56, 3)]
    for r in record["results"]:
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / (r["latency_ms"] / 1e3))
    lines = format_table(record).splitlines()
    assert len([ln for ln in lines if ln.split()[0].isdigit() and "linear-elu" in ln]) == 4
    assert sum(ln.startswith("skipped teacher at 56px") for ln in lines) == 2


def test_bench_batch_sizes_are_checked():
    with pytest.raises(ConfigError, match="batch_size"):
        bench(SPEC, ["linear-elu"], [28], batch_size=[1, 0], teacher_kwargs=TINY, memory=False)
    with pytest.raises(ConfigError, match="no batch sizes"):
        bench(SPEC, ["linear-elu"], [28], batch_size=[], teacher_kwargs=TINY, memory=False)


def test_cli_batch_sizes_and_teacher_limit(tmp_path, capsys, one_thread):
    out = tmp_path / "b.json"
    common = ["bench", "--teacher", SPEC, *[f"--teacher-option={k}={str(v).lower()}" for k, v in TINY.items()],
              "--resolutions", "28,56", "--repeats", "1", "--warmup", "0", "--no-memory", "--quiet"]
    assert main([*common, "--batch-sizes", "1,2", "--teacher-max-resolution", "28", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["settings"]["batch_sizes"] == [1, 2] and record["settings"]["teacher_max_resolution"] == 28
    assert capsys.readouterr().out.splitlines()[0].split()[0] == "batch"
    assert main([*common, "--batch-size", "2", "--out", str(tmp_path / "c.json")]) == 0  # the single flag stays
    assert json.loads((tmp_path / "c.json").read_text())["settings"]["batch_sizes"] == [2]
    assert main([*common, "--batch-sizes", "1,x", "--out", str(tmp_path / "d.json")]) != 0


def test_old_single_batch_records_still_format():
    record = {"settings": {"batch_size": 1}, "results": [
        {"resolution": 28, "model": m, "tokens": 5, "images_per_s": 2.0, "peak_memory_mb": None}
        for m in ("teacher", "s")], "comparisons": [
        {"resolution": 28, "student": "s", "speedup": 1.0, "flop_bound": 1.1, "fraction_of_bound": 0.9}]}
    assert "1.00x" in format_table(record)
