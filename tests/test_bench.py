"""The GPU benchmark script runs end to end at tiny sizes on the CPU, so a session lent a GPU can trust
one call of `bash bench/gpu.sh` (its tables, its 90-second `tdiff train`, its metrics summary)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_prints_every_table_at_tiny_sizes(tmp_path):
    env = {**os.environ, "TDIFF_GPU_SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    out = result.stdout
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for preset in ("d2s8i", "d16", "d2s8i-tread"):
        assert f"│ {preset} " in out, out
    assert "error" not in out
    for column in ("model-only img/s", "full loop img/s", "loop/model", "first step s", "TFLOP/s", "MFU"):
        assert column in out
    assert "input pipeline alone" in out
    assert "images/s median" in out and '"step": ' in out  # the timed `tdiff train` and its metrics lines
    assert (tmp_path / "gpu-bench" / "run" / "checkpoints" / "latest").is_file()  # SIGINT left a checkpoint
