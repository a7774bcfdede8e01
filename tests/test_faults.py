"""The fault-injection bench passes at its smallest: `python bench/faults.py --quick` runs every scenario
(process-group signals, two runs in one folder, default run directories, a stale lock, a full disk, flipped
bytes and a truncated checkpoint) through the real CLI in child processes, and finds no traceback, no lost
checkpoint, no silently wrong output and no other break of the contract. About two minutes on two cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = (
    "process-group SIGTERM/SIGINT/SIGHUP, then --resume",
    "two runs into one --out",
    "two runs, default run directories",
    "stale lock after SIGKILL, then --resume",
    "disk full during a checkpoint",
    "flipped byte in the newest checkpoint",
    "truncated newest checkpoint",
)


def test_quick_fault_injection_finds_nothing_wrong(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "bench/faults.py", "--quick", "--keep", str(tmp_path / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    table = result.stdout
    for scenario in SCENARIOS:
        assert scenario in table, table
    assert result.returncode == 0, table + result.stderr[-3000:]
