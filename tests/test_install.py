"""Installed like a library: recipes ship inside the package and resolve by name from any directory,
also from a built wheel installed (not editable) in a fresh venv."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import adala
from adala.cli import main
from adala.configs import describe, packaged, resolve
from adala.errors import ConfigError
from adala.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_recipes_are_packaged_and_resolve_by_name(tmp_path, monkeypatch):
    names = packaged()
    assert {"demo", "paper-dinov2-l", "compare", "fashion-probe-112"} <= set(names)
    assert all(p.parent == Path(adala.__file__).resolve().parent / "configs" for p in names.values())
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: names must not depend on the working directory
    assert resolve("demo") == names["demo"] and resolve("demo.yaml") == names["demo"]
    assert load_recipe("paper-dinov2-l").teacher == "timm:vit_large_patch14_dinov2.lvd142m"
    local = tmp_path / "demo.yaml"  # a file of that name in the working directory wins: paths stay paths
    local.write_text("teacher: dinov2-s14\nstages:\n  s: {kind: linearize}\n")
    assert resolve("demo.yaml").resolve() == local.resolve()
    with pytest.raises(ConfigError, match="no packaged recipe of that name"):
        resolve("nope")
    with pytest.raises(ConfigError, match="not found"):
        resolve(str(tmp_path / "missing" / "demo.yaml"))  # a missing path is not silently a packaged name


def test_cli_recipes_lists_names_with_their_first_comment(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name, path in packaged().items():
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [name])
        assert describe(path) and describe(path) in line
    assert main(["run", "demo", "--check"]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["run", "nope", "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert "packaged: " in err and len(err.splitlines()) == 1


def test_demo_default_config_is_the_packaged_one(tmp_path, monkeypatch):
    from adala.demo import default_config

    monkeypatch.chdir(tmp_path)
    assert default_config() == packaged()["demo"]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, **kw)


@pytest.mark.slow
def test_built_wheel_runs_recipes_by_name_from_root(tmp_path):
    """Build the wheel, install it (no deps, no index) in a fresh venv that reuses this interpreter's
    installed packages (torch, timm, ...) through a .pth file, and run the CLI from /."""
    import shutil

    # build from a clean copy: setuptools builds in the source tree, and a stale build/ could leak into the wheel
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "out",
                                                             "*.egg-info", "__pycache__", ".*_cache"))
    dist = tmp_path / "dist"
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)])
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(dist.glob("adala-*.whl"))
    import zipfile

    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("adala/configs/")}
    assert {"adala/configs/demo.yaml", "adala/configs/paper-dinov2-l.yaml"} <= shipped

    venv = tmp_path / "venv"
    r = _run([sys.executable, "-m", "venv", str(venv)])
    assert r.returncode == 0, r.stderr[-2000:]
    py = venv / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # the outer site-packages as a plain path entry: its own .pth files (an editable adala) are not processed
    (Path(site) / "reuse_outer_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)])
    assert r.returncode == 0, r.stderr[-2000:]

    where = _run([str(py), "-c", "import adala; print(adala.__file__)"], cwd="/")
    assert where.returncode == 0 and where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    adala_bin = str(venv / "bin" / "adala")
    r = _run([adala_bin, "recipes"], cwd="/")
    assert r.returncode == 0 and "demo" in r.stdout and "paper-dinov2-l" in r.stdout, r.stdout + r.stderr
    for name in ("demo", "paper-dinov2-l"):
        r = _run([adala_bin, "run", name, "--check"], cwd="/")
        assert r.returncode == 0 and "valid" in r.stdout, r.stdout + r.stderr
    r = _run([str(py), "-c", "from adala.demo import default_config; print(default_config())"], cwd="/")
    assert r.returncode == 0 and r.stdout.strip().startswith(str(venv)), r.stdout + r.stderr
