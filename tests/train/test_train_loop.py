"""The training engine in one CPU process: schedule, optimizer groups, accumulation, clipping, AMP, data order,
logs, checkpoints (layout, write errors, non-finite stops) and in-process exact resume."""

from __future__ import annotations

import errno
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from ddp_worker import MLPObjective, SyntheticData, build
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import IterableDataset

from adala.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from adala.train import TrainConfig, all_reduce_mean, barrier, is_main, log_event, rank, read_log, train, world_size
from adala.train import checkpoint as ckpt_mod
from adala.train.checkpoint import verify
from adala.train.sampler import ResumableSampler
from adala.train.schedule import build_optimizer, lr_factor, trainable_parameters


def config(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, log_every=2, device="cpu", progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max()}"


def dir_hashes(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def ckpt_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())


# --- schedule, optimizer, config ------------------------------------------------------------------------

def test_lr_warmup_then_cosine_to_min_ratio(tmp_path):
    assert [lr_factor(s, 10, 4, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4, 0.1) < 1.0 and lr_factor(9, 10, 4, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 10, 0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))
    factors = [lr_factor(s, 10, 4, 0.1) for s in range(4, 10)]
    assert factors == sorted(factors, reverse=True)
    res = train(build(), SyntheticData(), config(steps=6, warmup_steps=2, log_every=1, min_lr_ratio=0.2),
                tmp_path, stage="t")
    assert [h["lr"] for h in res.history] == pytest.approx([3e-3 * lr_factor(s, 6, 2, 0.2) for s in range(6)])


def test_adamw_groups_skip_decay_for_biases_norms_and_frozen_params():
    class Obj(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
            self.student.pos = nn.Parameter(torch.zeros(1, 3, 4))
            self.student.no_weight_decay = lambda: {"pos"}
            self.teacher = nn.Linear(4, 4).requires_grad_(False)

    obj = Obj()
    opt = build_optimizer(obj, trainable_parameters(obj), lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    s = obj.student
    assert decay == {id(s[0].weight)}
    assert no_decay == {id(s[0].bias), id(s[1].weight), id(s[1].bias), id(s.pos)}
    assert not {id(p) for p in obj.teacher.parameters()} & (decay | no_decay)


@pytest.mark.parametrize("bad", [dict(amp="fp8"), dict(steps=0), dict(device="tpu"), dict(grad_clip=-1.0),
                                 dict(min_lr_ratio=2.0), dict(accum_steps=0), dict(keep=0), dict(ema=1.0),
                                 dict(added_lr_scale=0.0)])
def test_invalid_config_is_a_config_error(tmp_path, bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        train(build(), SyntheticData(), config(**bad), tmp_path, stage="t")
    assert not (tmp_path / "checkpoints").exists()


def test_dataset_smaller_than_a_batch_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="fewer than one batch"):
        train(build(), SyntheticData(3), config(), tmp_path, stage="t")


# --- the loop -------------------------------------------------------------------------------------------

def test_training_learns_logs_and_leaves_teacher_alone(tmp_path):
    obj = build(dropout=0.0, noise=False)
    teacher = weights(obj.teacher)
    res = train(obj, SyntheticData(), config(steps=40, lr=1e-2, log_every=10), tmp_path, stage="t")
    assert res.steps == 40 and res.out_dir == tmp_path and res.wall_time_s > 0
    assert [h["step"] for h in res.history] == [10, 20, 30, 40]
    assert res.history[-1]["loss"] < 0.6 * res.history[0]["loss"]
    assert res.final["loss"] == res.history[-1]["loss"] and res.final["const"] == 2.0 and "mae" in res.final
    assert {"step", "lr"}.isdisjoint(res.final)
    assert_same(weights(obj.teacher), teacher)
    assert obj.modes == (True, False)  # the student trains, the frozen teacher stays in eval mode
    records = read_log(tmp_path)
    assert records[0]["event"] == "start"
    logged = [r for r in records if "event" not in r]
    assert [r["step"] for r in logged] == [10, 20, 30, 40]
    assert {"loss", "lr", "mae", "imgs_per_s", "grad_norm"} <= logged[0].keys()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    saved = ckpt_mod.load_checkpoint(tmp_path / "checkpoints" / "step-0000040")
    assert saved.student.keys() == obj.student.state_dict().keys()  # the teacher is not checkpointed
    assert_same(saved.student, weights(obj.student))


def test_grad_accumulation_equals_the_bigger_batch(tmp_path):
    a, b = build(dropout=0.0, noise=False), build(dropout=0.0, noise=False)
    ra = train(a, SyntheticData(), config(batch_size=8, accum_steps=1, log_every=1), tmp_path / "a", stage="t")
    rb = train(b, SyntheticData(), config(batch_size=4, accum_steps=2, log_every=1), tmp_path / "b", stage="t")
    assert b.calls == 2 * a.calls
    for key in ("loss", "grad_norm"):  # the accumulated gradient is the mean, not the sum, of micro-batches
        assert [h[key] for h in rb.history] == pytest.approx([h[key] for h in ra.history], rel=1e-5)
    for (k, va), vb in zip(a.student.state_dict().items(), b.student.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=k)
    c = build(dropout=0.0, noise=False)
    train(c, SyntheticData(), config(batch_size=4, accum_steps=1), tmp_path / "c", stage="t")
    assert not torch.allclose(c.student[0].weight, a.student[0].weight, atol=1e-6)


def test_grad_clipping_bounds_the_update_norm(tmp_path):
    seen = []

    def before_step(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        res = train(build(), SyntheticData(), config(grad_clip=0.01, log_every=1), tmp_path, stage="t")
    finally:
        handle.remove()
    assert len(seen) == 6
    assert all(h["grad_norm"] > 0.1 for h in res.history)  # pre-clip norms are logged
    assert max(seen) <= 0.01 * (1 + 1e-4)


@pytest.mark.parametrize("amp,dtype", [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16),
                                       ("fp16", torch.float16)])
def test_amp_modes_on_cpu(tmp_path, amp, dtype):
    obj = build()
    train(obj, SyntheticData(), config(steps=2, amp=amp), tmp_path, stage="t")
    assert set(obj.dtypes) == {dtype}
    assert all(p.dtype == torch.float32 for p in obj.student.parameters())  # master weights stay fp32
    state = json.loads((tmp_path / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert (state["scaler"] is not None) == (amp == "fp16")


def test_fp16_overflow_skips_the_step_instead_of_stopping(tmp_path):
    updates = []
    handle = register_optimizer_step_pre_hook(lambda *a: updates.append(1))
    try:
        obj = build(inf_grad_at=2)
        res = train(obj, SyntheticData(), config(steps=4, amp="fp16", log_every=1), tmp_path, stage="t")
    finally:
        handle.remove()
    assert res.steps == 4 and len(updates) == 3  # GradScaler skipped the overflowing update
    state = json.loads((tmp_path / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["scaler"]["scale"] < 65536.0
    with pytest.raises(NonFiniteError, match="non-finite loss at step 3"):
        train(build(nan_at=3), SyntheticData(), config(steps=4, amp="fp16"), tmp_path / "nan", stage="t")


# --- non-finite values and write errors leave the last checkpoint alone -------------------------------

@pytest.fixture
def spy_writes(monkeypatch):
    """Hashes of each checkpoint directory right after it was written."""
    written: dict[str, dict[str, str]] = {}
    real = ckpt_mod.write_checkpoint

    def spy(root, step, *a, **kw):
        path = real(root, step, *a, **kw)
        written[path.name] = dir_hashes(path)
        return path

    monkeypatch.setattr("adala.train.loop.write_checkpoint", spy)
    return written


@pytest.mark.parametrize("inject,what", [(dict(nan_at=5), "loss"), (dict(inf_grad_at=5), "gradient of student.3.bias")])
def test_non_finite_stops_without_saving(tmp_path, spy_writes, inject, what):
    with pytest.raises(NonFiniteError) as err:
        train(build(**inject), SyntheticData(), config(steps=8, ckpt_every=2), tmp_path, stage="align")
    msg = str(err.value)
    assert msg.startswith(f"align: non-finite {what} at step 5") and "step-0000004" in msg and "\n" not in msg
    assert ckpt_names(tmp_path) == ["step-0000002", "step-0000004"]
    assert dir_hashes(tmp_path / "checkpoints" / "step-0000004") == spy_writes["step-0000004"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    assert read_log(tmp_path)[-1]["event"] == "non_finite"


@pytest.mark.parametrize("fail_on", ["optimizer.safetensors", "manifest.json"])
def test_full_disk_mid_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, spy_writes, fail_on):
    import adala.models.weights as weights_mod

    real_save, real_json = weights_mod.save_file, ckpt_mod._write_json

    def disk_full(path):
        if "step-0000004.tmp" in str(path) and Path(path).name.startswith((fail_on, f".{fail_on}")):
            Path(path).write_bytes(b"\0" * 10)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights_mod, "save_file", lambda t, p, metadata=None: disk_full(p) or real_save(t, p, metadata))
    monkeypatch.setattr(ckpt_mod, "_write_json", lambda p, o: disk_full(p) or real_json(p, o))
    with pytest.raises(CheckpointError, match="No space left on device") as err:
        train(build(), SyntheticData(), config(steps=6, ckpt_every=2), tmp_path, stage="t")
    assert "step-0000002 is untouched" in str(err.value)
    assert ckpt_names(tmp_path) == ["step-0000002"]  # no step-4, not even as .tmp
    assert dir_hashes(tmp_path / "checkpoints" / "step-0000002") == spy_writes["step-0000002"]
    assert verify(tmp_path / "checkpoints" / "step-0000002") is None


# --- checkpoints and resume in-process -----------------------------------------------------------------

def test_checkpoint_layout_manifest_keep_and_no_pickle(tmp_path):
    train(build(), SyntheticData(), config(steps=6, ckpt_every=2, keep=2), tmp_path, stage="t")
    root = tmp_path / "checkpoints"
    assert ckpt_names(tmp_path) == ["step-0000004", "step-0000006"]
    assert (root / "latest").read_text().strip() == "step-0000006"
    step = root / "step-0000006"
    manifest = json.loads((step / "manifest.json").read_text())
    names = {p.name for p in step.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == names
    assert {"student.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json"} <= names
    for name, info in manifest["files"].items():
        assert hashlib.sha256((step / name).read_bytes()).hexdigest() == info["sha256"]
        assert not (step / name).read_bytes().startswith(b"\x80")  # no pickle stream
    state = json.loads((step / "state.json").read_text())
    assert (state["step"], state["stage"], state["config"]["lr"]) == (6, "t", 3e-3)
    assert {"epoch", "batch", "scheduler", "world_size", "student_shapes"} <= state.keys()
    loaded = ckpt_mod.load_checkpoint(step)
    assert {"rank0/torch", "rank0/numpy", "rank0/python"} <= loaded.rng.keys()
    assert any(k.endswith("/exp_avg_sq") for k in loaded.optimizer)


def crash_then_resume(out: Path, crash_at: int, cfg: TrainConfig, **kw):
    with pytest.raises(KeyboardInterrupt):
        train(build(crash_at=crash_at, **kw), SyntheticData(), cfg, out, stage="t")
    resumed = build(**kw)
    return resumed, train(resumed, SyntheticData(), TrainConfig(**{**cfg.__dict__, "resume": True}), out,
                          stage="t")


def test_resume_after_a_crash_is_exact(tmp_path):
    cfg = config(steps=12, ckpt_every=3, accum_steps=2, log_every=4)  # log windows straddle checkpoints
    ref = build(extra=True)
    ref_res = train(ref, SyntheticData(), cfg, tmp_path / "ref", stage="t")
    resumed, res = crash_then_resume(tmp_path / "run", crash_at=17, cfg=cfg, extra=True)  # dies inside step 9
    assert resumed.calls == 2 * (12 - 6)  # restarted from step-6 (step-9 was never written)
    assert_same(weights(resumed), weights(ref))  # student and the trainable tensor outside it
    assert torch.equal(torch.cat(resumed.seen), torch.cat(ref.seen[12:]))  # the same batches, in order
    def logged(history):
        return [{k: v for k, v in h.items() if k != "imgs_per_s"} for h in history]

    assert [h["step"] for h in res.history] == [4, 8, 12]
    assert logged(res.history) == logged(ref_res.history)  # loss, lr, metrics, grad norm: all identical
    assert {"event": "resume", "from_step": 6}.items() <= next(
        r for r in read_log(tmp_path / "run") if r.get("event") == "resume").items()
    again = build(extra=True)
    res2 = train(again, SyntheticData(), TrainConfig(**{**cfg.__dict__, "resume": True}), tmp_path / "run", stage="t")
    assert again.calls == 0 and res2.steps == 12 and res2.final == res.final  # finished run: nothing to do


def test_resume_skips_a_corrupt_checkpoint_with_a_warning(tmp_path):
    cfg = config(steps=12, ckpt_every=3, keep=3)
    ref = build()
    train(ref, SyntheticData(), cfg, tmp_path / "ref", stage="t")
    with pytest.raises(KeyboardInterrupt):
        train(build(crash_at=11), SyntheticData(), cfg, tmp_path / "run", stage="t")
    bad = tmp_path / "run" / "checkpoints" / "step-0000009" / "student.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    resumed = build()
    with pytest.warns(RuntimeWarning, match="step-0000009.*student.safetensors is truncated"):
        train(resumed, SyntheticData(), TrainConfig(**{**cfg.__dict__, "resume": True}), tmp_path / "run", stage="t")
    assert resumed.calls == 12 - 6
    assert_same(weights(resumed.student), weights(ref.student))
    assert "step-0000009.corrupt" in ckpt_names(tmp_path / "run")


@pytest.mark.parametrize("change,match", [
    (dict(stage="other"), "stage 't'"),
    (dict(hidden=32), "student differs"),
    (dict(lr=1e-3), r"config differs \(lr 0.003 -> 0.001\)"),
])
def test_resume_refuses_another_stage_model_or_config(tmp_path, change, match):
    train(build(), SyntheticData(), config(steps=4, ckpt_every=2), tmp_path, stage="t")
    before = dir_hashes(tmp_path)
    stage = change.pop("stage", "t")
    hidden = change.pop("hidden", 16)
    obj = build(hidden=hidden)
    with pytest.raises(CheckpointError, match=match) as err:
        train(obj, SyntheticData(), config(steps=4, ckpt_every=2, resume=True, **change), tmp_path, stage=stage)
    assert "\n" not in str(err.value) and obj.calls == 0
    assert dir_hashes(tmp_path) == before  # nothing written, nothing overwritten


def test_fresh_run_refuses_to_overwrite_checkpoints(tmp_path):
    train(build(), SyntheticData(), config(steps=2), tmp_path, stage="t")
    before = dir_hashes(tmp_path)
    with pytest.raises(CheckpointError, match="resume=True"):
        train(build(), SyntheticData(), config(steps=2), tmp_path, stage="t")
    assert dir_hashes(tmp_path) == before


def test_worker_processes_give_the_same_run(tmp_path):
    a, b = build(), build()
    train(a, SyntheticData(), config(steps=3, num_workers=0), tmp_path / "a", stage="t")
    train(b, SyntheticData(), config(steps=3, num_workers=2), tmp_path / "b", stage="t")
    assert torch.equal(torch.cat(a.seen), torch.cat(b.seen))
    assert_same(weights(a.student), weights(b.student))


# --- data order ------------------------------------------------------------------------------------------

def test_sampler_is_deterministic_sharded_and_resumable():
    def s(rank=0, world=1, seed=0):
        return ResumableSampler(23, batch_size=3, seed=seed, rank=rank, world_size=world)

    assert list(s()) == list(s()) and list(s()) != list(s(seed=1))
    a = s()
    a.set_position(1)
    assert list(a) != list(s()) and len(list(a)) == 21 == len(a)
    shards = [list(s(r, 2)) for r in range(2)]
    assert all(len(x) == 9 for x in shards) and not set(shards[0]) & set(shards[1])
    full = s(1, 2)
    tail = s(1, 2)
    tail.set_position(0, 2)
    assert list(tail) == list(full)[6:] and len(tail) == 3


def test_epochs_wrap_around_with_a_new_permutation(tmp_path):
    obj = build()
    train(obj, SyntheticData(10), config(steps=6), tmp_path, stage="t")  # 2 batches of 4 per epoch -> 3 epochs
    epochs = [torch.cat(obj.seen[i:i + 2]) for i in (0, 2, 4)]
    for e in epochs:
        assert len({tuple(r.tolist()) for r in e}) == 8  # no item twice within an epoch
    assert not torch.equal(epochs[0], epochs[1])


def test_iterable_dataset_is_supported(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            return (SyntheticData()[i] for i in range(10))

    obj = build()
    res = train(obj, Stream(), config(steps=5), tmp_path, stage="t")
    assert res.steps == 5 and obj.calls == 5
    assert torch.equal(obj.seen[2], obj.seen[0])  # second pass over the stream


# --- helpers stages use ---------------------------------------------------------------------------------

def test_distributed_helpers_in_a_single_process():
    assert (rank(), world_size(), is_main()) == (0, 1, True)
    t = torch.tensor([1.5, 2.0])
    assert torch.equal(all_reduce_mean(t), t)
    barrier()


def test_log_event_appends_json_lines(tmp_path):
    log_event(tmp_path, {"event": "skipped_image", "path": Path("a.jpg"), "loss": torch.tensor(0.5)})
    log_event(tmp_path, {"event": "resume", "from_step": 3})
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert recs[0]["path"] == "a.jpg" and recs[0]["loss"] == 0.5 and "time" in recs[0]
    assert recs[1]["from_step"] == 3 and read_log(tmp_path) == recs


def test_objective_without_student_or_trainable_params_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="student"):
        train(nn.Linear(2, 2), SyntheticData(), config(), tmp_path, stage="t")
    frozen = MLPObjective()
    frozen.student.requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        train(frozen, SyntheticData(), config(), tmp_path, stage="t")


# --- weight averaging -------------------------------------------------------------------------------------

def test_ema_is_the_warmed_up_average_of_the_trajectory_and_resumes_exactly(tmp_path):
    """The EMA run trains exactly as the plain run (same live weights), and its result is the average computed
    by hand from the plain run's per-step weights; a crash + resume gives the same average and the same
    live trajectory; the checkpoint's student is the average."""
    decay, steps = 0.8, 8
    plain_cfg = config(steps=steps, ckpt_every=1, keep=steps)
    plain = build()
    start = weights(plain.student)
    train(plain, SyntheticData(), plain_cfg, tmp_path / "plain", stage="t")
    expected = {k: v.clone() for k, v in start.items()}
    for s in range(1, steps + 1):
        live = ckpt_mod.load_checkpoint(tmp_path / "plain" / "checkpoints" / f"step-{s:07d}").student
        d = min(decay, (1 + s) / (10 + s))
        expected = {k: d * expected[k] + (1 - d) * live[k] for k in expected}
    cfg = config(steps=steps, ckpt_every=2, ema=decay)
    avg = build()
    train(avg, SyntheticData(), cfg, tmp_path / "ema", stage="t")
    got = weights(avg.student)
    assert not torch.allclose(got["0.weight"], weights(plain.student)["0.weight"])  # the average, not the last
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    last = ckpt_mod.load_checkpoint(tmp_path / "ema" / "checkpoints" / f"step-{steps:07d}")
    assert_same({k: v for k, v in last.student.items()}, got)
    resumed, _ = crash_then_resume(tmp_path / "crash", crash_at=6, cfg=cfg)  # dies inside step 6, resumes at 4
    assert_same(weights(resumed.student), got)
    with pytest.raises(CheckpointError, match="ema 0.8 -> 0.5"):
        train(build(), SyntheticData(), TrainConfig(**{**cfg.__dict__, "resume": True, "ema": 0.5}),
              tmp_path / "crash", stage="t")
