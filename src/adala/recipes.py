"""YAML recipes: the stages of a ViT-AdaLA run, in order, each feeding the next (``adala run``).

A recipe names a teacher, a default image size and seed, optional training ``defaults`` (applied to every
stage that accepts the key), optional ``threads`` (torch CPU threads for the run) and an ordered ``stages``
mapping ``name -> {kind, from, ...}``; alignment stages take ``data`` as one spec or a list mixed equally.
Stage ``name`` writes to ``OUT/name/``; ``from`` names an earlier stage (or ``teacher``) whose model it
starts from. ``OUT/summary.json`` lists every stage in order with its kind, output directory and final metrics.

Re-running a recipe reuses finished stages: a stage is skipped when its directory holds its outputs
(``adala.json`` + ``metrics.json``; ``metrics.json`` for ``evaluate``) and the fingerprint of its resolved
settings (and of everything upstream) is unchanged. An interrupted training stage resumes from its last
checkpoint; a changed stage is re-run from scratch, with everything downstream. ``fresh=True`` re-runs all.

Validation is strict and happens before any work: unknown keys, wrong types and impossible values raise a
``ConfigError`` naming the key (``stages.stage1.steps: must be a positive integer, got -3``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .attention import registry as attention_registry
from .configs import resolve
from .data.build import heldout_spec, parse_spec
from .errors import AdalaError, ConfigError
from .evaluation import TASKS as EVAL_TASKS
from .evaluation import evaluate
from .files import write_json
from .models import linearize, load_teacher
from .models.io import state_mismatch
from .models.resolve import as_model, check_img_size
from .models.teachers import EMBEDDED
from .outdir import check_target, claim, created_by_adala, write_marker
from .stages import align_attention, align_features, finetune
from .stages.align_attention import TRAINABLE
from .stages.align_features import LOSSES
from .stages.finetune import TASKS as FINETUNE_TASKS
from .stages.result import finish
from .train.distributed import barrier, is_main
from .train.loop import AMP_MODES, DEVICES

STAGE_KINDS = ("linearize", "align-attention", "align-features", "finetune", "evaluate")
TOP_KEYS = {"teacher", "img_size", "seed", "defaults", "stages", "description", "threads"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SUMMARY = "summary.json"
FINGERPRINT = "stage.json"


# ------------------------------------------------------------------------------------ value checkers

def _int(minimum: int) -> Callable[[str, Any], Any]:
    def check(key: str, v: Any) -> Any:
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ConfigError(f"{key}: must be {what}, got {v!r}")
        return v
    return check


def _num(minimum: float = 0.0, strict: bool = True, maximum: float | None = None) -> Callable[[str, Any], Any]:
    def check(key: str, v: Any) -> Any:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
        if ok:
            ok = v > minimum if strict else v >= minimum
            ok = ok and (maximum is None or v <= maximum)
        if not ok:
            rng = f"> {minimum}" if strict else f">= {minimum}"
            rng += f" and <= {maximum}" if maximum is not None else ""
            raise ConfigError(f"{key}: must be a number {rng}, got {v!r}")
        return float(v)
    return check


def _str(key: str, v: Any) -> Any:
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"{key}: must be a non-empty string, got {v!r}")
    return v


def _data(key: str, v: Any) -> Any:
    """A data spec, or (alignment stages) a list of specs mixed in equal parts."""
    if isinstance(v, list) and v and all(isinstance(s, str) and s.strip() for s in v):
        return v
    if isinstance(v, str) and v.strip():
        return v
    raise ConfigError(f"{key}: must be a data spec or a non-empty list of data specs, got {v!r}")


def _bool(key: str, v: Any) -> Any:
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: must be true or false, got {v!r}")
    return v


def _choice(*options: Any) -> Callable[[str, Any], Any]:
    def check(key: str, v: Any) -> Any:
        if isinstance(v, bool) or v not in options:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, options))}, got {v!r}")
        return v
    return check


def _int_list(key: str, v: Any) -> Any:
    if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
        raise ConfigError(f"{key}: must be a list of block indices (integers >= 0), got {v!r}")
    return v


def _mapping(key: str, v: Any) -> Any:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise ConfigError(f"{key}: must be a mapping, got {v!r}")
    return v


def _teacher_flag(key: str, v: Any) -> Any:
    if isinstance(v, bool) or (isinstance(v, str) and v.strip()):
        return v
    raise ConfigError(f"{key}: must be true/false or a teacher spec, got {v!r}")


def _grad_clip(key: str, v: Any) -> Any:
    return None if v is None else _num()(key, v)


def _cache(key: str, v: Any) -> Any:
    if v in ("auto", True, False):
        return v
    raise ConfigError(f"{key}: must be auto, true or false, got {v!r}")


TRAIN_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "seed": _int(0), "warmup_steps": _int(0), "weight_decay": _num(0.0, strict=False),
    "min_lr_ratio": _num(0.0, strict=False, maximum=1.0), "grad_clip": _grad_clip, "accum_steps": _int(1),
    "amp": _choice(*AMP_MODES), "num_workers": _int(0), "log_every": _int(1),
    "ckpt_every": _int(0), "keep": _int(1), "device": _choice(*DEVICES), "progress": _bool,
    "ema": _num(0.0, strict=False, maximum=0.9999), "added_lr_scale": _num(),
}
def _sizes(key: str, v: Any) -> Any:
    """One image size, or (align-features, evaluate) a non-empty list of sizes."""
    if isinstance(v, list) and v:
        for i, x in enumerate(v):
            _int(1)(f"{key}[{i}]", x)
        return v
    return _int(1)(key, v)


MULTI_SIZE_KINDS = ("align-features", "evaluate")
COMMON = {"kind": _str, "from": _str, "img_size": _sizes}
KIND_KEYS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "linearize": {"attention": _str, "keep_softmax": _int_list, "options": _mapping},
    "align-attention": {"attention": _str, "data": _data, "steps": _int(1), "batch_size": _int(1), "lr": _num(),
                        "trainable": _choice(*TRAINABLE), "train": _choice(*TRAINABLE), "length": _int(1),
                        "train_options": _mapping, **TRAIN_KEYS},
    "align-features": {"data": _data, "steps": _int(1), "batch_size": _int(1), "lr": _num(),
                       "loss": _choice(*LOSSES), "trainable": _choice(*TRAINABLE), "train": _choice(*TRAINABLE),
                       "length": _int(1), "mosaic": _num(0.0, strict=False, maximum=1.0),
                       "cls_weight": _num(0.0, strict=False), "train_options": _mapping, **TRAIN_KEYS},
    "finetune": {"task": _choice(*FINETUNE_TASKS), "data": _str,
                 "epochs": _num(), "steps": _int(1), "batch_size": _int(1), "lr": _num(), "head": _str,
                 "freeze_backbone": _bool, "length": _int(1), "eval_data": _str, "eval_length": _int(1),
                 "cache_features": _cache, **TRAIN_KEYS},
    "evaluate": {"task": _choice(*EVAL_TASKS),
                 "data": _str,
                 "teacher": _teacher_flag, "batch_size": _int(1), "length": _int(1),
                 "device": _choice(*DEVICES), "num_workers": _int(0), "options": _mapping},
}
REQUIRED = {"finetune": ("from", "data"), "align-features": ("from",), "evaluate": ("from", "task", "data")}
DEFAULT_KEYS = {**TRAIN_KEYS, "batch_size": _int(1)}


@dataclass
class Stage:
    name: str
    kind: str
    source: str | None            # "teacher", an earlier stage name, or None (align-attention: linearize)
    options: dict[str, Any]       # resolved: defaults applied, img_size set

    def model_dir(self, out: Path) -> Path:
        return out / self.name


@dataclass
class Recipe:
    teacher: str
    img_size: int
    seed: int
    stages: list[Stage]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str | None = None
    threads: int | None = None    # torch CPU threads for the run (None: torch's default)


# ------------------------------------------------------------------------------------------- parsing

def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """``key.sub.key=value`` (value parsed as YAML) into the raw mapping; parents must exist."""
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        path, value = item.split("=", 1)
        keys = [k.strip() for k in path.split(".")]
        if not all(keys):
            raise ConfigError(f"--set {item!r}: empty key in {path!r}")
        node = raw
        for i, k in enumerate(keys[:-1]):
            if not isinstance(node, dict) or not isinstance(node.get(k), dict):
                where = ".".join(keys[: i + 1])
                raise ConfigError(f"--set {path}: {where} is not a section of the recipe")
            node = node[k]
        try:
            node[keys[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {path}: value {value!r} is not valid YAML ({e})") from None
    return raw


def _patch_hint(teacher: str) -> int | None:
    """The teacher's patch size when it can be read without loading weights (spec name or adala.json)."""
    if teacher == "dinov2-s14":
        return 14
    p = Path(teacher)
    if p.is_dir() and (p / "adala.json").is_file():
        try:
            return int(json.loads((p / "adala.json").read_text()).get("patch_size") or 0) or None
        except (ValueError, OSError):
            return None
    m = re.search(r"patch(\d+)", teacher)
    return int(m.group(1)) if m else None


def parse_recipe(raw: Any, source: str | None = None) -> Recipe:
    """Validate a recipe mapping (as loaded from YAML) into a :class:`Recipe`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {source or ''}: must be a mapping with 'teacher' and 'stages'".replace(" :", ":"))
    # top-level "x-..." keys hold shared settings for YAML anchors (``<<: *name``), as in docker-compose
    unknown = sorted(k for k in set(map(str, raw)) - TOP_KEYS if not k.startswith("x-"))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown recipe key (known: {', '.join(sorted(TOP_KEYS))}, x-*)")
    teacher = _str("teacher", raw.get("teacher", "dinov2-s14"))
    img_size = _int(1)("img_size", raw.get("img_size", 224))
    seed = _int(0)("seed", raw.get("seed", 0))
    threads = raw.get("threads")
    if threads is not None:
        _int(1)("threads", threads)
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"description: must be a string, got {description!r}")
    defaults = _mapping("defaults", raw.get("defaults") or {})
    for k, v in defaults.items():
        if k not in DEFAULT_KEYS:
            raise ConfigError(f"defaults.{k}: unknown training default (known: {', '.join(sorted(DEFAULT_KEYS))})")
        DEFAULT_KEYS[k](f"defaults.{k}", v)
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError("stages: must be a non-empty mapping of stage name -> settings")
    patch = _patch_hint(teacher)
    stages: list[Stage] = []
    kinds: dict[str, str] = {}
    for name, body in stages_raw.items():
        key = f"stages.{name}"
        if not isinstance(name, str) or not _NAME.match(name) or name in ("teacher", SUMMARY):
            raise ConfigError(f"{key}: stage names must be plain directory names (letters, digits, _ . -), "
                              "not 'teacher'")
        if not isinstance(body, dict):
            raise ConfigError(f"{key}: must be a mapping with at least 'kind', got {body!r}")
        kind = body.get("kind")
        if kind not in STAGE_KINDS:
            raise ConfigError(f"{key}.kind: must be one of {', '.join(STAGE_KINDS)}, got {kind!r}")
        allowed = {**COMMON, **KIND_KEYS[kind]}
        for k, v in body.items():
            if k not in allowed:
                raise ConfigError(f"{key}.{k}: unknown key for a {kind} stage (known: {', '.join(sorted(allowed))})")
            allowed[k](f"{key}.{k}", v)
        if isinstance(body.get("img_size"), list) and kind not in MULTI_SIZE_KINDS:
            raise ConfigError(f"{key}.img_size: a list of sizes is only for {' and '.join(MULTI_SIZE_KINDS)} stages")
        for k in REQUIRED.get(kind, ()):
            if k not in body:
                raise ConfigError(f"{key}.{k}: required for a {kind} stage")
        src = body.get("from")
        if src is not None and src != "teacher":
            if src not in kinds:
                raise ConfigError(f"{key}.from: {src!r} is not an earlier stage (or 'teacher')")
            if kinds[src] == "evaluate":
                raise ConfigError(f"{key}.from: {src!r} is an evaluate stage and has no model")
        if kind == "align-attention" and src is not None and "attention" in body:
            raise ConfigError(f"{key}.attention: give either 'from' (a linearized student) or 'attention'")
        if kind in ("align-attention", "align-features") and src == "teacher":
            raise ConfigError(f"{key}.from: {kind} trains a linearized student, not the teacher")
        opts = {k: v for k, v in body.items() if k not in ("kind", "from")}
        opts.setdefault("img_size", img_size)
        sizes = opts["img_size"] if isinstance(opts["img_size"], list) else [opts["img_size"]]
        for size in sizes:
            if patch and size % patch:
                where = f"{key}.img_size" if "img_size" in body else "img_size"
                raise ConfigError(f"{where}: {size} is not a multiple of the teacher's patch size {patch}")
        if kind != "linearize":
            for k, v in defaults.items():
                if k in KIND_KEYS[kind] and k not in opts:
                    opts[k] = v
            if kind != "evaluate" and "seed" not in opts:
                opts["seed"] = seed
        stages.append(Stage(name=name, kind=kind, source=src, options=opts))
        kinds[name] = kind
    return Recipe(teacher=teacher, img_size=img_size, seed=seed, stages=stages, defaults=defaults,
                  description=description, source=source, threads=threads)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error: plain YAML lets the
    last one win, so a second ``stage1:`` would silently replace the first. Keys merged in with ``<<:`` may
    still be overridden, as YAML anchors intend."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                continue
            if first != key_node.start_mark.line + 1:
                raise ConfigError(f"{key}: duplicate key in {self._recipe} (lines {first} and "
                                  f"{key_node.start_mark.line + 1}); each key may appear once per mapping")
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, source: str) -> Any:
    loader = _UniqueKeyLoader(text)
    loader._recipe = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Parse a recipe file, or a packaged recipe by name (``demo``, ``paper-dinov2-l``; see ``adala recipes``)."""
    p = resolve(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {p} is not a text (UTF-8 YAML) file: undecodable byte at offset {e.start}; "
                          "pass the recipe's .yaml file") from None
    except OSError as e:
        raise ConfigError(f"recipe {p} cannot be read ({e.strerror or e})") from None
    if "\x00" in text:
        raise ConfigError(f"recipe {p} is not a text (YAML) file: it holds NUL bytes; pass the recipe's .yaml file")
    try:
        raw = _load_yaml(text, str(p))
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"recipe {p} is not valid YAML ({first})") from None
    return parse_recipe(apply_overrides(raw if isinstance(raw, dict) else raw, overrides), source=str(p))


# -------------------------------------------------------------------------------------------- running

def _fingerprint(recipe: Recipe, stage: Stage, upstream: str | None) -> str:
    run_only = {"progress", "log_every", "num_workers", "device", "ckpt_every", "keep"}
    opts = {k: v for k, v in stage.options.items() if k not in run_only}
    blob = json.dumps({"kind": stage.kind, "teacher": recipe.teacher, "options": opts, "upstream": upstream},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _finished(stage: Stage, d: Path) -> bool:
    if not (d / "metrics.json").is_file():
        return False
    return stage.kind == "evaluate" or (d / "adala.json").is_file()


TRAINING_KINDS = ("align-attention", "align-features", "finetune")


def check_inputs(recipe: Recipe) -> list[str]:
    """What ``adala run --check`` adds to the schema; returns one line per thing checked.

    Why: the schema alone passes a mistyped attention kind, option or data spec, which would then fail only when
    its stage starts, perhaps an hour into a run (or, for an option, used to be dropped). So: every data spec
    parses, and no training stage reads held-out photos; the teacher's *architecture* is built without its
    weights (offline, 0.4-2.5 s; ``hf:`` teachers need the hub for that, so their kinds are checked by
    name only), every stage that linearizes builds its student on it, which checks the kind, its option names
    and values the way the run will, and an evaluate stage's ``options`` are rebuilt on that student and
    refused if they would change its weights (as ``load_model`` will).
    """
    return [_check_data(recipe), _check_students(recipe)]


def _check_data(recipe: Recipe) -> str:
    specs = 0
    for st in recipe.stages:
        for key in ("data", "eval_data"):
            value = st.options.get(key)
            for spec in value if isinstance(value, list) else [value] if value else []:
                try:
                    parsed = parse_spec(spec)
                except AdalaError as e:
                    raise ConfigError(f"stages.{st.name}.{key}: {e}") from None
                if key == "data" and st.kind in TRAINING_KINDS and heldout_spec(parsed):
                    raise ConfigError(f"stages.{st.name}.data: {spec!r} is the held-out evaluation set; a "
                                      "training stage must not read it (train on photos or wallpapers)")
                specs += 1
    return f"{specs} data specs parse; no training stage reads held-out photos"


def _check_students(recipe: Recipe) -> str:
    # the stage that linearized each stage's student, inherited along `from`; None: the teacher itself
    root: dict[str, str | None] = {}
    for st in recipe.stages:
        builds = st.kind == "linearize" or (st.kind == "align-attention" and st.source is None)
        root[st.name] = st.name if builds else root.get(st.source) if st.source not in (None, "teacher") else None
    built = [st for st in recipe.stages if root[st.name] == st.name]
    # an evaluation's `options` and an alignment's `train_options` rebuild the student with other options
    key = {st.name: "options" if st.kind == "evaluate" else "train_options" for st in recipe.stages}
    rebuilt = [st for st in recipe.stages if st.options.get(key[st.name])]
    for st in rebuilt:
        if root[st.name] is None:
            raise ConfigError(f"stages.{st.name}.{key[st.name]}: {st.source} has no linear attention: attention "
                              "options do not apply to it")
    if recipe.teacher.startswith("hf:"):
        for st in built:
            try:
                attention_registry.get(st.options.get("attention", "linear-elu"))
            except AdalaError as e:
                raise ConfigError(f"stages.{st.name}.attention: {e}") from None
        return f"{len(built)} attention kinds known (an hf: teacher's architecture needs the hub)"
    # a hub architecture on the meta device: no weights to initialise (ViT-L: 0.3 s instead of 6 s); a teacher
    # read from a file (the embedded one, a local directory) loads as the run will
    from_file = recipe.teacher in EMBEDDED or os.path.exists(recipe.teacher)
    with contextlib.nullcontext() if from_file else torch.device("meta"):
        arch = load_teacher(recipe.teacher, pretrained=False)

    def build(st: Stage, more: dict[str, Any]) -> torch.nn.Module:
        return linearize(arch, st.options.get("attention", "linear-elu"), keep_softmax=st.options.get("keep_softmax"),
                         **{**st.options.get("options", {}), **more})

    students = {}
    for st in built:
        try:
            students[st.name] = build(st, {})
        except AdalaError as e:
            raise ConfigError(f"stages.{st.name}: {e}") from None
    by_name = {st.name: st for st in recipe.stages}
    for st in rebuilt:
        changed = st.options[key[st.name]]
        try:
            mismatch = state_mismatch(build(by_name[root[st.name]], changed), students[root[st.name]].state_dict())
        except AdalaError as e:
            raise ConfigError(f"stages.{st.name}.{key[st.name]}: {e}") from None
        if mismatch:
            raise ConfigError(f"stages.{st.name}.{key[st.name]}: {sorted(changed)} change the weights of "
                              f"{st.source or st.name}'s student, so they cannot be set here ({mismatch})")
    return (f"teacher {recipe.teacher}: architecture built; {len(built)} students linearized on it, "
            f"{len(rebuilt)} rebuilt with a stage's options")


def _stored_fingerprint(d: Path) -> str | None:
    try:
        return json.loads((d / FINGERPRINT).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _read_metrics(d: Path) -> dict:
    try:
        return json.loads((d / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def _run_stage(recipe: Recipe, stage: Stage, teacher, source_model, d: Path, resume: bool) -> dict:
    opts = dict(stage.options)
    if stage.kind == "linearize":
        img_size = opts.pop("img_size")
        base = teacher if source_model is None else as_model(source_model)
        check_img_size(base, img_size, f"stages.{stage.name}.img_size")
        model = linearize(base, opts.get("attention", "linear-elu"), keep_softmax=opts.get("keep_softmax"),
                          **opts.get("options", {}))
        return finish(model, d, {"stage": "linearize", "attention": opts.get("attention", "linear-elu"),
                                 "blocks": model.adala_config["attention"]["blocks"]}).metrics
    if stage.kind == "evaluate":
        flag = opts.pop("teacher", None)
        t = teacher if flag is True else (flag if isinstance(flag, str) else None)
        result = evaluate(source_model, teacher=t, out=d, **opts)
        if is_main():
            write_json(d / "metrics.json", result)
        return result
    if resume:
        opts["resume"] = True
    if "train" in opts:  # the recipe key before 0.2 (kept in the fingerprint as written)
        opts["trainable"] = opts.pop("train")
    if stage.kind == "align-attention":
        return align_attention(teacher, source_model, out=d, **opts).metrics
    if stage.kind == "align-features":
        return align_features(teacher, source_model, out=d, **opts).metrics
    return finetune(source_model, out=d, **opts).metrics


def run_recipe(recipe: Recipe | str | os.PathLike, out: str | os.PathLike, *, fresh: bool = False,
               overrides: Iterable[str] = (), log: Callable[[str], None] | None = print,
               force: bool = False) -> dict:
    """Run every stage of ``recipe`` into ``out``; returns (and writes) the summary.

    ``out`` is locked for the whole run (a second run on it fails at once) and must be new, empty or an
    earlier run's (see :mod:`adala.outdir`); ``force`` writes into a directory adala did not create.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise ConfigError("overrides apply to a recipe file, not to a parsed Recipe")
    out = Path(out)
    check_target(out, [("teacher", recipe.teacher)], force=force)
    teacher_path = Path(recipe.teacher)
    if teacher_path.exists() and out.exists() and teacher_path.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--out {out} holds the teacher {recipe.teacher}; re-running stages there could "
                          "delete it; choose another --out")
    say = log if (log is not None and is_main()) else (lambda _m: None)
    threads_before = torch.get_num_threads()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    try:
        with claim(out, "run"):
            return _run(recipe, out, fresh, say, force)
    finally:
        torch.set_num_threads(threads_before)


def _run(recipe: Recipe, out: Path, fresh: bool, say: Callable[[str], None], force: bool = False) -> dict:
    teacher = load_teacher(recipe.teacher)

    for st in recipe.stages:  # teachers whose patch size was not visible in the spec
        sizes = st.options["img_size"]
        for size in sizes if isinstance(sizes, list) else [sizes]:
            check_img_size(teacher, size, f"stages.{st.name}.img_size")
    summary: dict[str, Any] = {"recipe": recipe.source, "teacher": recipe.teacher, "img_size": recipe.img_size,
                               "seed": recipe.seed, "stages": []}
    prints: dict[str, str] = {}
    t_all = time.perf_counter()
    for st in recipe.stages:
        d = st.model_dir(out)
        upstream = prints.get(st.source) if st.source and st.source != "teacher" else None
        fp = _fingerprint(recipe, st, upstream)
        prints[st.name] = fp
        same = _stored_fingerprint(d) == fp
        entry: dict[str, Any] = {"name": st.name, "kind": st.kind, "from": st.source or "teacher", "out": str(d)}
        if not fresh and same and _finished(st, d):
            say(f"[{st.name}] {st.kind}: finished earlier, reusing {d}")
            entry.update(status="skipped", wall_time_s=0.0, metrics=_read_metrics(d))
            summary["stages"].append(entry)
            continue
        resume = not fresh and same and (d / "checkpoints").is_dir() and st.kind not in ("linearize", "evaluate")
        if d.exists() and not resume:
            if not force and (not d.is_dir() or (any(d.iterdir()) and not created_by_adala(d))):
                raise ConfigError(f"stages.{st.name}: {d} exists and adala did not create it; re-running the "
                                  "stage would delete it (move it away, or pass --force)")
            if is_main():
                shutil.rmtree(d) if d.is_dir() else d.unlink()
            barrier()
        if is_main():
            d.mkdir(parents=True, exist_ok=True)
            write_marker(d, st.kind)
            write_json(d / FINGERPRINT, {"fingerprint": fp, "kind": st.kind, "from": st.source,
                                         "options": st.options, "teacher": recipe.teacher})
        barrier()
        say(f"[{st.name}] {st.kind}" + (" (resuming)" if resume else "") + f" -> {d}")
        source_model = None if st.source in (None, "teacher") else str(out / st.source)
        if st.source == "teacher" and st.kind in ("finetune", "evaluate"):
            source_model = teacher
        t0 = time.perf_counter()
        try:
            metrics = _run_stage(recipe, st, teacher, source_model, d, resume)
        except AdalaError as e:
            raise type(e)(f"stage {st.name} ({st.kind}): {e}") from None
        entry.update(status="ran", wall_time_s=round(time.perf_counter() - t0, 2), metrics=metrics)
        summary["stages"].append(entry)
        if is_main():
            write_json(out / SUMMARY, summary)
        say(f"[{st.name}] done in {entry['wall_time_s']:.1f}s {headline(metrics)}")
    summary["wall_time_s"] = round(time.perf_counter() - t_all, 2)
    if is_main():
        write_json(out / SUMMARY, summary)
    barrier()
    return summary


def _match(res: dict) -> str:
    """A correspondence result in one phrase: accuracy, its share of the teacher's and both smoothnesses."""
    out = f"match={res['accuracy']:.3f} ({res['ratio_to_teacher']:.1%} of teacher"
    if "adjacent_cosine" in res:
        out += f"; adjacent cos {res['adjacent_cosine']:.3f} vs {res['teacher_adjacent_cosine']:.3f}"
    return out + ")"


def headline(metrics: dict) -> str:
    """A few key numbers of a stage's metrics for one line of output."""
    keys = ("loss", "cosine", "top1", "miou", "mean_class_accuracy")
    parts = [f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float))]
    fid = metrics.get("fidelity")
    if isinstance(fid, dict):
        parts += [f"final_cosine={fid['final_cosine']:.4f}", f"attn_rel_err={fid['attn_rel_err_mean']:.4f}"]
    for size, res in (metrics.get("by_size") or {}).items():
        f = res.get("fidelity") or {}
        if "final_cosine" in f:
            parts.append(f"{size}²: cos={f['final_cosine']:.3f} cls={f['cls_cosine']:.3f} "
                         f"struct={f['structure_k10']:.3f}")
        elif "accuracy" in res:
            parts.append(f"{size}²: {_match(res)}")
    if metrics.get("task") == "correspondence" and "accuracy" in metrics:
        parts.append(_match(metrics))
    return " ".join(parts)
