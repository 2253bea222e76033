"""Runs ``triton_kernel_cases.py`` (Triton kernels vs the float64 reference) in triton's CPU interpreter.

triton decides interpreter-or-compiler when the kernels are defined, so the cases need their own
process with ``TRITON_INTERPRET=1``; on a CUDA machine run that file directly for the compiled kernels.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adala
from adala.errors import ConfigError

CASES = Path(__file__).with_name("triton_kernel_cases.py")


def test_triton_kernels_match_the_reference_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, env=env, timeout=600)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 20, tail
    assert not re.search(r"skipped|failed|error", summary), summary


def test_kernel_option_is_checked_and_saved(tmp_path) -> None:
    t = adala.load_teacher("timm:vit_small_patch14_dinov2", pretrained=False, img_size=56, depth=1,
                           embed_dim=64, num_heads=2)
    with pytest.raises(ConfigError, match="kernel must be one of"):
        adala.linearize(t, "linear-elu", kernel="cuda")
    m = adala.linearize(t, "linear-elu", kernel="torch")
    back = adala.load_model(adala.save_model(m, tmp_path / "m"))
    assert back.blocks[0].attn.kernel == "torch"
    assert adala.linearize(t, "linear-elu").blocks[0].attn.kernel == "auto"
    x = torch.randn(1, 3, 56, 56)
    with torch.inference_mode():
        torch.testing.assert_close(back.forward_features(x), m.forward_features(x))
