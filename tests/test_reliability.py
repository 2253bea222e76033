"""Issue 18, reliability round two: one run per output directory, outputs never overwrite inputs or a user's
files, resumes check every option of the optimisation problem, and user mistakes fail in one line.

New modules are imported inside the tests, so that against the code before the fix each test fails for its
own reason rather than all at collection."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_teacher
from PIL import Image

import adala
from adala.cli import main
from adala.errors import CheckpointError, ConfigError, DataError, UnsupportedModelError
from adala.stages import align_attention, align_features, finetune

FAST = {"progress": False, "log_every": 1}
LOCK, MARKER = ".adala.lock", ".adala-out.json"  # adala.outdir's names (imported lazily: see below)
SRC = str(Path(adala.__file__).resolve().parent.parent)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (names relative to it): equal digests mean nothing was touched."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A saved tiny teacher and its saved linearized student (directories, as a CLI user has them)."""
    root = tmp_path_factory.mktemp("models")
    teacher = tiny_teacher(img_size=28)
    adala.save_model(teacher, root / "teacher")
    adala.save_model(adala.linearize(teacher), root / "student")
    return root / "teacher", root / "student"


def _child(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


# ------------------------------------------------------------------------------------ 1: one run per dir


def test_second_run_on_a_locked_out_fails_at_once_and_leaves_the_first_alone(tmp_path, dirs):
    teacher, student = dirs
    out = tmp_path / "run"
    holder = _child(f"import time, pathlib; from adala.outdir import claim\n"
                    f"with claim(pathlib.Path({str(out)!r}), 'align-features'):\n"
                    f"    print('held', flush=True); time.sleep(60)")
    try:
        assert holder.stdout.readline().strip() == b"held"
        before = tree_digest(out)
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=rf"is in use by pid {holder.pid} on .*align-features"):
            align_features(str(teacher), str(student), img_size=28, steps=1, batch_size=2, out=out, **FAST)
        assert time.perf_counter() - t0 < 5  # refused before loading any model or data
        assert tree_digest(out) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died by SIGKILL: its lock file is left, but nobody holds it any more
    assert (out / LOCK).is_file()
    res = align_features(str(teacher), str(student), img_size=28, steps=1, batch_size=2, out=out, **FAST)
    assert res.metrics["steps"] == 1 and not (out / LOCK).exists() and (out / MARKER).is_file()


def test_stale_lock_of_a_dead_pid_is_taken_over_without_flock(tmp_path, monkeypatch):
    """Where flock is unsupported (some network filesystems) the pid in the lock decides."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    from adala.outdir import OutLock

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "o"
    out.mkdir()
    host = __import__("socket").gethostname()
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": host}))
    lock = OutLock(out, "test").acquire()
    assert lock.took_over["pid"] == dead.pid
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / LOCK).exists()
    (out / LOCK).write_text(json.dumps({"pid": os.getppid(), "host": host}))  # alive
    with pytest.raises(ConfigError, match=f"in use by pid {os.getppid()}"):
        OutLock(out, "test").acquire()
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": "another-host"}))  # cannot be checked
    with pytest.raises(ConfigError, match="another-host"):
        OutLock(out, "test").acquire()


def test_lock_released_and_nothing_left_when_the_stage_fails(tmp_path, dirs):
    teacher, student = dirs
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match="loss must be"):
        align_features(str(teacher), str(student), img_size=28, steps=1, out=out, loss="nope")
    assert not out.exists()
    out.mkdir()
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        align_features(str(teacher), str(student), img_size=30, steps=1, out=out)
    assert list(out.iterdir()) == []


def test_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    from adala.outdir import claim

    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "o"
    with claim(out, "x"):
        assert not out.exists()  # rank 0 creates, locks and marks it
    monkeypatch.setenv("RANK", "0")
    with claim(out, "x"):
        assert (out / LOCK).is_file() and (out / MARKER).is_file()
    assert not (out / LOCK).exists()


def test_sigterm_prints_one_line_releases_the_lock_and_leaves_a_resumable_checkpoint(tmp_path, dirs):
    teacher, student = dirs
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "adala", "align-features", "--teacher", str(teacher), "--student", str(student),
           "--img-size", "28", "--steps", "100000", "--batch-size", "2", "--ckpt-every", "1", "--quiet",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "latest").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    err = err.decode().strip()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.splitlines() == [err] and "terminated (SIGTERM)" in err and "--resume" in err
    assert not (out / LOCK).exists()
    from adala.train.checkpoint import find_latest

    loaded, skipped = find_latest(out / "checkpoints")
    assert loaded is not None and not skipped


# ---------------------------------------------------------------------------- 2, 3: inputs and user files


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_out_equal_to_an_input_directory_is_refused_and_the_input_untouched(dirs, which, capsys):
    teacher, student = dirs
    target = student if which == "student" else teacher
    before = tree_digest(target)
    argv = ["align-features", "--teacher", str(teacher), "--student", str(student), "--img-size", "28",
            "--steps", "1", "--out", str(target)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"is the {which} directory this run reads" in err and len(err.splitlines()) == 1
    assert tree_digest(target) == before
    with pytest.raises(ConfigError, match="is the model directory"):
        finetune(str(student), data="fashion-mnist", steps=1, out=student)
    assert tree_digest(target) == before


def _user_dir(root: Path) -> Path:
    root.mkdir()
    (root / "model.safetensors").write_bytes(os.urandom(256))
    (root / "log.jsonl").write_text('{"mine": true}\n')
    return root


def test_a_users_non_empty_directory_is_refused_unless_force(tmp_path, dirs, capsys):
    teacher, student = dirs
    user = _user_dir(tmp_path / "mine")
    before = tree_digest(user)
    argv = ["align-features", "--teacher", str(teacher), "--student", str(student), "--img-size", "28",
            "--steps", "1", "--batch-size", "2", "--quiet", "--out", str(user)]
    assert main(argv) == 2
    assert "adala did not create" in capsys.readouterr().err
    assert tree_digest(user) == before and sorted(p.name for p in user.iterdir()) == ["log.jsonl",
                                                                                      "model.safetensors"]
    assert main([*argv, "--force"]) == 0
    assert (user / MARKER).is_file() and (user / "metrics.json").is_file()


def test_runs_from_before_the_marker_still_resume(tmp_path, dirs):
    teacher, student = dirs
    out = tmp_path / "old"
    align_features(str(teacher), str(student), img_size=28, steps=2, batch_size=2, out=out, ckpt_every=1, **FAST)
    (out / MARKER).unlink()
    (out / "metrics.json").unlink()  # as if killed after the last checkpoint
    res = align_features(str(teacher), str(student), img_size=28, steps=2, batch_size=2, out=out, resume=True,
                         **FAST)
    assert res.metrics["steps"] == 2 and not res.already_finished


def test_recipe_refuses_a_users_directory_and_never_deletes_it(tmp_path, dirs):
    from adala.recipes import parse_recipe, run_recipe

    teacher, _ = dirs
    recipe = parse_recipe({"teacher": str(teacher), "img_size": 28, "stages": {
        "s1": {"kind": "align-attention", "steps": 1, "batch_size": 2, "progress": False}}})
    user = _user_dir(tmp_path / "mine")
    before = tree_digest(user)
    with pytest.raises(ConfigError, match="adala did not create"):
        run_recipe(recipe, user, log=None)
    assert tree_digest(user) == before
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text("{}")
    stage_dir = _user_dir(out / "s1")  # a user's folder where the stage would go
    before = tree_digest(stage_dir)
    with pytest.raises(ConfigError, match="stages.s1: .* adala did not create"):
        run_recipe(recipe, out, log=None)
    assert tree_digest(stage_dir) == before


# ------------------------------------------------------------------------------ 4: the resume fingerprint


@pytest.mark.parametrize("stage, change, match", [
    ("features", {"img_size": 56}, "img_size 28 -> 56"),
    ("features", {"loss": "cosine"}, "loss 'mse' -> 'cosine'"),
    ("features", {"trainable": "attention"}, "train 'all' -> 'attention'"),
    ("features", {"data": "fashion-mnist:train"}, "data 'photos' -> 'fashion-mnist:train'"),
    ("attention", {"img_size": 56}, "img_size 28 -> 56"),
    ("attention", {"trainable": "attention+proj"}, "train 'attention' -> 'attention\\+proj'"),
    ("attention", {"data": "fashion-mnist:train"}, "data 'photos' -> 'fashion-mnist:train'"),
])
def test_resume_refuses_any_change_of_the_optimisation_problem(tmp_path, dirs, stage, change, match):
    teacher, student = dirs
    run = align_features if stage == "features" else align_attention
    base = {"img_size": 28, "steps": 2, "batch_size": 2, "data": "photos", "length": 8, "out": tmp_path / "o",
            "ckpt_every": 1, **FAST}
    run(str(teacher), str(student), **base)
    (tmp_path / "o" / "metrics.json").unlink()  # an interrupted run
    with pytest.raises(CheckpointError, match=f"stage options differ \\({match}\\)"):
        run(str(teacher), str(student), **{**base, **change}, resume=True)


def test_resume_refuses_another_teacher(tmp_path, dirs):
    teacher, student = dirs
    other = tmp_path / "other_teacher"
    t2 = tiny_teacher(img_size=28)
    torch.nn.init.normal_(t2.blocks[0].attn.qkv.weight)
    adala.save_model(t2, other)
    base = {"img_size": 28, "steps": 2, "batch_size": 2, "out": tmp_path / "o", **FAST}
    align_features(str(teacher), str(student), **base)
    with pytest.raises(CheckpointError, match="stage options differ \\(teacher"):
        align_features(str(other), str(student), **base, resume=True)


def test_resume_on_a_finished_run_is_a_no_op(tmp_path, dirs, capsys):
    teacher, student = dirs
    out = tmp_path / "o"
    argv = ["align-features", "--teacher", str(teacher), "--student", str(student), "--img-size", "28",
            "--steps", "2", "--batch-size", "2", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    before = tree_digest(out)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert "already finished (2 steps); --resume had nothing to do" in capsys.readouterr().out
    assert tree_digest(out) == before
    res = align_features(str(teacher), str(student), img_size=28, steps=2, batch_size=2, out=out, resume=True)
    assert res.already_finished and res.metrics == json.loads((out / "metrics.json").read_text())
    x = torch.randn(1, 3, 28, 28)
    assert torch.equal(res.model(x), adala.load_model(out)(x))
    assert tree_digest(out) == before


def test_existing_checkpoints_refusal_names_the_cli_flag(tmp_path, dirs, capsys):
    teacher, student = dirs
    out = tmp_path / "o"
    align_attention(str(teacher), str(student), img_size=28, steps=1, batch_size=2, out=out, **FAST)
    (out / "metrics.json").unlink()
    assert main(["align-attention", "--teacher", str(teacher), "--student", str(student), "--img-size", "28",
                 "--steps", "1", "--batch-size", "2", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "continue that run with --resume (resume=True in Python)" in err


# ---------------------------------------------------------------------------------- 5: one-line errors


def test_weights_of_another_architecture_are_summarised_in_one_line(tmp_path, dirs, capsys):
    _, student = dirs
    foreign = tmp_path / "foreign"
    adala.save_model(adala.linearize(tiny_teacher(img_size=28, depth=3, embed_dim=32)), foreign)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "adala.json").write_bytes((student / "adala.json").read_bytes())
    for name in ("model.safetensors", "model.safetensors.sha256"):
        (mixed / name).write_bytes((foreign / name).read_bytes())
    with pytest.raises(CheckpointError, match=r"another architecture, not 'vit_small_patch14_dinov2': "
                                              r"14 unexpected \(blocks\.2\..*; 34 shape mismatches \(cls_token, .*"
                                              r"e\.g\. cls_token is \[1, 1, 32\] in the file, \[1, 1, 64\]"):
        adala.load_model(mixed)
    assert main(["linearize", "--teacher", str(mixed), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds weights of another architecture" in err


@pytest.mark.parametrize("field, value, match", [
    ("attention", "linear-elu", "attention must be a mapping or null, got a string"),
    ("attention", {"blocks": "linear-elu"}, "attention.blocks must be a non-empty list"),
    ("mean", [0.5, 0.5], "mean must be a list of 3 numbers"),
    ("timm_kwargs", [], "timm_kwargs must be a mapping"),
    ("task", {"type": 3}, "task.type must be a string"),
])
def test_config_fields_of_the_wrong_type_are_one_line_errors(tmp_path, dirs, field, value, match):
    _, student = dirs
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in student.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((bad / "adala.json").read_text())
    cfg[field] = value
    (bad / "adala.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        adala.load_model(bad)


def test_binary_file_as_a_recipe(tmp_path, capsys):
    blob = tmp_path / "model.safetensors"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" + os.urandom(64))
    assert main(["run", str(blob), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a text (UTF-8 YAML) file" in err and len(err.splitlines()) == 1
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"teacher: a\x00b\n")
    from adala.recipes import load_recipe

    with pytest.raises(ConfigError, match="NUL bytes"):
        load_recipe(nul)


@pytest.mark.parametrize("out", ["/proc/adala-test/x", "/sys/adala-test"])
def test_out_that_cannot_be_created_is_one_line(dirs, out, capsys):
    teacher, student = dirs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = main(["align-features", "--teacher", str(teacher), "--student", str(student), "--img-size", "28",
                     "--steps", "1", "--batch-size", "2", "--quiet", "--out", out])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("adala: error: cannot create") and len(err.splitlines()) == 1


def test_unwritable_log_is_one_logged_line_not_warnings(tmp_path, caplog):
    from adala.train.logs import log_event

    blocker = tmp_path / "file"
    blocker.write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.WARNING, logger="adala"):
            for i in range(3):
                log_event(blocker / "run", {"event": "x", "i": i})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "could not append to" in lines[0]


def test_image_size_whose_activations_cannot_fit_is_refused_with_the_estimate(tmp_path, dirs, monkeypatch):
    from adala.train import devices
    from adala.train.devices import activation_bytes, available_memory, check_fits

    free, where = available_memory(torch.device("cpu"))
    assert free is not None and free > 0 and where == "of RAM available"
    monkeypatch.setattr(devices, "available_memory", lambda device: (16 * 2**30, "of RAM available"))
    teacher, student = dirs
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=r"img_size=99988 cannot fit: 51,008,165 tokens x 64 wide x 2 blocks "
                                          r"x batch 2 need at least 320\.8 GiB of activations for training, "
                                          r"16\.0 GiB of RAM available"):
        align_features(str(teacher), str(student), img_size=99988, steps=1, batch_size=2, out=out)
    assert not out.exists()

    need, tokens = activation_bytes(tiny_teacher(img_size=28), 224, 8, train=True)
    assert tokens == 16 * 16 + 1 and need == 8 * (257 * 64 * 2 * 2 * 4 + 3 * 224 * 224 * 4)
    check_fits(tiny_teacher(img_size=28), 224, 8, "cpu")  # ordinary sizes pass


# ------------------------------------------------------------------------------------ 6: wds bad members


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_wds_bad_member_is_counted_and_listed_without_warnings(tmp_path, dirs, caplog):
    teacher, student = dirs
    shard = tmp_path / "shard-0.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            data = b"not a jpeg at all" if i == 2 else _jpeg(i)
            info = tarfile.TarInfo(f"s{i:03d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with caplog.at_level(logging.WARNING, logger="adala"):
            res = align_features(str(teacher), str(student), data=f"wds:{shard}", img_size=28, steps=3,
                                 batch_size=2, out=tmp_path / "o", **FAST)
    assert res.metrics["steps"] == 3
    assert not [w for w in seen if issubclass(w.category, UserWarning)], [str(w.message) for w in seen]
    events = [json.loads(x) for x in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e.get("event") == "skipped_images"]
    assert len(skipped) == 1 and skipped[0]["count"] >= 1
    assert all("s002" in f["path"] and "not an image" in f["reason"] for f in skipped[0]["files"])
    summary = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(summary) == 1 and "listed in" in summary[0]
    assert not list((tmp_path / "o").glob(".skipped*"))


# -------------------------------------------------------------------------------------- 7: smaller ones


def test_bench_refuses_a_student_of_another_teacher():
    from adala.benchmark import bench

    teacher = tiny_teacher(img_size=28)
    other = adala.linearize(tiny_teacher(img_size=28, embed_dim=32))
    with pytest.raises(UnsupportedModelError, match="other: student does not match the teacher: embed dim"):
        bench(teacher, {"other": other}, resolutions=[28], repeats=1, warmup=0, memory=False)


def test_rgb_masks_are_named_as_masks_with_the_wrong_mode(tmp_path):
    from adala.data import build_dataset

    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        Image.open(io.BytesIO(_jpeg(i))).save(root / "images" / f"a{i}.jpg")
        Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(root / "masks" / f"a{i}.png")
    with pytest.raises(DataError, match=r"3 of 3 masks are not single-channel label maps \(e\.g\. the mask of "
                                        r"a0\.jpg has mode RGB\)"):
        build_dataset(f"folder:{root}", task="segmentation", img_size=28, mean=(0, 0, 0), std=(1, 1, 1),
                      train=False)


def test_duplicate_key_in_a_recipe_is_an_error_naming_it(tmp_path):
    from adala.recipes import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text("teacher: dinov2-s14\nstages:\n  s1: {kind: align-attention, steps: 3}\n"
                 "  s1: {kind: align-attention, steps: 5}\n")
    with pytest.raises(ConfigError, match=r"s1: duplicate key in .* \(lines 3 and 4\)"):
        load_recipe(p)
    p.write_text("x-base: &base {kind: align-attention, steps: 3}\nstages:\n  s1: {<<: *base, steps: 5}\n")
    assert load_recipe(p).stages[0].options["steps"] == 5  # overriding a merged key stays allowed
