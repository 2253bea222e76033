"""``adala.evaluate`` and ``adala.bench`` are the documented functions, whatever submodules were imported first."""

from __future__ import annotations

import subprocess
import sys


def test_public_functions_keep_their_names_after_subpackage_imports():
    code = (
        "import adala.evaluation.metrics, adala.benchmark.flops, adala\n"
        "import inspect\n"
        "assert inspect.isfunction(adala.evaluate) and adala.evaluate.__name__ == 'evaluate', adala.evaluate\n"
        "assert inspect.isfunction(adala.bench) and adala.bench.__name__ == 'bench', adala.bench\n"
        "from adala import evaluate, bench\n"
        "assert inspect.isfunction(evaluate) and inspect.isfunction(bench)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
