"""Every benchmark script of bench/ runs end to end at tiny sizes on the CPU, so its tables can be trusted
to print when someone runs it at full size. bench/gpu.sh (which also runs bench/train_throughput.py and
bench/sampling.py at tiny sizes) is below; bench/faults.py has tests/test_faults.py. Children run with
OMP_NUM_THREADS=1: on a shared machine, spinning OpenMP threads make these tiny models slower, not faster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf"), **extra}


def run_script(tmp_path: Path, script: str, *args: str) -> str:
    """stdout of `python bench/SCRIPT ARGS` from the repository root; fails on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=bench_env(tmp_path, OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stdout


def test_gpu_script_prints_every_table_at_tiny_sizes(tmp_path):
    """The GPU benchmark script runs end to end at tiny sizes on the CPU, so a session lent a GPU can trust
    one call of `bash bench/gpu.sh` (its tables, its 90-second `tdiff train`, its metrics summary)."""
    env = {
        **os.environ,
        "TDIFF_GPU_SMOKE": "1",
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "HF_HOME": str(tmp_path / "hf"),
    }
    result = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
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


def test_acceleration_prints_its_training_and_sampling_tables_at_tiny_sizes(tmp_path):
    """d2s8i and its -tread twin at width 64 (the smallest: one head of 64), 1 timed step of batch 2; one
    image at 4 DPM-Solver++(2M) steps, uncached and through both cache plans (random weights)."""
    out = run_script(
        tmp_path,
        "acceleration.py",
        "--presets",
        "d2s8i",
        "--width",
        "64",
        "--train-batch",
        "2",
        "--train-steps",
        "1",
        "--sample-batch",
        "1",
        "--sample-steps",
        "4",
        "--repeats",
        "1",
        "--threads",
        "1",
    )
    assert "## Training: batch 2, median of 1 steps" in out, out
    assert "| preset | route | GFLOP/image fwd | GFLOP/step fwd+bwd | images/s | speed-up |" in out, out
    assert "| d2s8i | none |" in out and re.search(r"\| d2s8i \| \d+\.\.\d+ @ 0\.5 \|", out), out
    assert "## Sampling: DPM-Solver++(2M), 4 steps, batch 1" in out, out
    assert "| model | cache (span:boundary:interval) | skipped | images/s | speed-up | PSNR vs uncached, dB |" in out
    rows = [line for line in out.splitlines() if line.startswith("| d2s8i (random) |")]
    assert len(rows) == 3, out  # uncached, the default plan, 8:30:3
    assert rows[0].startswith("| d2s8i (random) | none | 0% |"), out
    assert all(not row.split("|")[3].strip().startswith("0.0%") for row in rows[1:]), out  # the caches skip


def test_digits_quality_compares_tread_with_plain_at_tiny_sizes(tmp_path):
    """The TREAD comparison (the script's default mode) with a budget of about one chunk of one step per
    model, 10 samples of 4 steps; `--run RUN` (scoring a trained run) runs in tests/test_docs.py, from
    docs/presets.md."""
    grids = tmp_path / "grids"
    out = run_script(
        tmp_path,
        "digits_quality.py",
        "--minutes",
        "0.0001",
        "--chunk",
        "1",
        "--samples",
        "10",
        "--sample-steps",
        "4",
        "--sample-threads",
        "1",
        "--out",
        str(grids),
    )
    assert "digits 16x16: 898 train / 899 test; MLP judge accuracy on real test images" in out, out
    assert "| model | steps in 0.0001 CPU-min | images per CPU-s |" in out, out
    assert "| plain | 1 |" in out and "| TREAD 2..12 @ 0.5 | 1 |" in out, out
    assert "Δ-DiT cache, 4 DPM-Solver++(2M) steps, same noise as above" in out, out
    assert "| model | cache (span:boundary:interval) | skipped | accuracy | MLP-FID | PSNR vs uncached, dB |" in out
    assert sum(line.startswith(("| plain | ", "| TREAD 2..12 @ 0.5 | ")) for line in out.splitlines()) == 6, out
    assert len(list(grids.glob("*.png"))) == 6, sorted(grids.iterdir())  # 2 models x (uncached + 2 plans)
