"""Fault injection end to end: stop signals, two runs in one folder, a full disk and damaged checkpoints,
each through the real `tdiff` command line in child processes, on the `tiny` preset on the CPU.

    python bench/faults.py                                  # every scenario: a few minutes on 2 cores
    python bench/faults.py --trials 30 --keep /tmp/faults   # more signal trials; keep every run folder
    python bench/faults.py --quick                          # fewest trials and steps (tests/test_faults.py)

Data: 64 of scikit-learn's 8x8 digits upscaled to 16x16 RGB, written to the work folder as an .npz
(in memory: no DataLoader workers) and as an image folder (one sub-folder of PNGs per class, decoded by
`--num-workers 2` worker processes). Two fault-free reference runs, made once, with the settings and seed
of the trials that are compared with them: 12 steps on the .npz (a checkpoint every 4, keep_last 2) and 40
steps (20 with --quick) on the folder (one every 5); and reference samples of the first (`tdiff sample
RUN -n 4 --steps 2`, EMA and --no-ema). "Equal to the reference": every tensor of model, ema and
state.safetensors of the final checkpoint bit for bit (read with safetensors.safe_open), or samples.npz.

1. process-group signals: `tdiff train` on the folder in a session of its own; after its "step K" line
   for a seeded random K (1 in the first trial) and a further random wait of up to one mean step time of
   the reference (0 in the first trial), os.killpg, as Slurm's scancel does: SIGTERM, and SIGINT and
   SIGHUP in the 3rd and 5th trial of every five. Waiting for a step line means tdiff's handlers are in
   place (a signal during Python's imports kills any program); counting steps, not seconds, spreads the
   moments over the training period whatever the machine's load, the last two steps left out. Exit 128 + the
   signal, no traceback, a loadable checkpoint at the step reached that checkpoints/latest names; then
   `tdiff train --resume RUN` (or `--resume --out RUN`, alternately) exits 0 equal to the reference.
2. two runs into one --out, started at once: the first to print a "step" line is paused (SIGSTOP) until
   the other has exited, then continued (SIGCONT), so that the two overlap whatever the machine's load.
   It exits 0 equal to the reference, its metrics.jsonl and config.toml those of the reference; the
   other exits 2 with one `error:` line naming its PID and host.
   two runs with default run directories, started at once in an empty folder: distinct
   runs/tiny-digits-<time>[...] folders, both exit 0 equal to the reference. A pair whose runs name
   their folders in different seconds leaves the collision untested: another pair follows, up to 3 (2
   with --quick), and a note says when none collided.
   stale lock: a run killed by SIGKILL (its whole group) just after its first checkpoint; `--resume`
   exits 0, naming the dead PID on stderr, equal to the reference.
3. disk full during a checkpoint: as root where `mount -t tmpfs` works, the run directory is a tmpfs with
   room for the first checkpoint but not the second; elsewhere os.fsync raises ENOSPC for every file
   under checkpoints/ once a first checkpoint exists (the CLI run through `python -c`, INJECT_ENOSPC).
   Exit 1 with one `failed:` line, no temporary file or folder (".NAME.tmp") left under RUN, the first
   checkpoint loadable; `--resume` with room again (the tmpfs remounted larger; the plain CLI) exits 0
   equal to the reference. The scenario's name in the table says which mechanism ran; the tmpfs run is
   copied to disk-full-run before it is unmounted.
4. flipped byte: the lowest bit of one byte of model, ema or state.safetensors of the newest checkpoint
   of a copy of the reference flipped, in the tensor data or in the JSON header. `tdiff sample RUN`
   (EMA) and `--no-ema` (model) exit 2 with one `error:` line naming the file when they read the damaged
   one, else exit 0 with the reference's samples; `tdiff train --resume RUN` warns naming the damaged
   checkpoint, trains again from the previous one and exits 0 equal to the reference.
5. truncated newest checkpoint: one of its files cut to half; `--resume` exits 0 equal to the reference.

Columns: trials; tracebacks (commands with "Traceback" on stderr); lost checkpoints (one finished before
the fault, gone or unloadable after it); silently wrong (a command exited 0 with a result that differs
from the reference's, or passed damaged data off as good); contract breaks (anything else the contract
above asks for: exit codes, messages, leftover temporary files); notes: what broke, and how often (every
trial's notes also go to stderr as it ends). Exit status 1 when any of the four counts is non-zero.
Children run with OMP_NUM_THREADS=1, --jobs trials at a time; all of it is CPU-only and offline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = "checkpoints"
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.safetensors")
COMMON_FLAGS = [
    "--preset",
    "tiny",
    "--cpu",
    "--seed",
    "3",
    "--batch-size",
    "8",
    "--set",
    "model.image_size=16",
    "--set",
    "train.demo_every=0",
    "--set",
    "train.log_every=1",
    "--set",
    "train.keep_last=2",
]
SAMPLE_FLAGS = ["-n", "4", "--steps", "2", "--device", "cpu"]
SIGNAL_CYCLE = (signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
COMMAND_TIMEOUT = 300  # seconds for any one command; a hung one is killed and counted as a break

# The table's rows, in this order
SIGNALS = "process-group SIGTERM/SIGINT/SIGHUP, then --resume"
SHARED_OUT = "two runs into one --out"
DEFAULT_DIRS = "two runs, default run directories"
STALE_LOCK = "stale lock after SIGKILL, then --resume"
DISK_FULL_TMPFS = "disk full during a checkpoint (small tmpfs)"
DISK_FULL_FSYNC = "disk full during a checkpoint (ENOSPC from os.fsync)"
FLIPPED = "flipped byte in the newest checkpoint"
TRUNCATED = "truncated newest checkpoint"
SCENARIOS = (SIGNALS, SHARED_OUT, DEFAULT_DIRS, STALE_LOCK, DISK_FULL_TMPFS, DISK_FULL_FSYNC, FLIPPED, TRUNCATED)

# `python -c INJECT_ENOSPC RUN tdiff-arguments...`: the CLI with os.fsync failing as on a full disk for
# every file under RUN/checkpoints/ once RUN's first checkpoint (checkpoints/latest) exists.
INJECT_ENOSPC = """
import errno, os, runpy, sys
run = sys.argv.pop(1)
real_fsync = os.fsync
def full_disk_fsync(fd):
    target = os.readlink(f"/proc/self/fd/{fd}")
    if os.path.exists(os.path.join(run, "checkpoints", "latest")) and "/checkpoints/" in target:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
    return real_fsync(fd)
os.fsync = full_disk_fsync
runpy.run_module("tdiff", run_name="__main__")
"""


# ------------------------------------------------------------------------------------------------
# What the children did, and the tally of a trial


@dataclass(frozen=True)
class Finished:
    """A finished command: its exit code (negative: killed by that signal; None: hung, then killed)."""

    code: int | None
    stderr: str

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.stderr

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith(prefix)]

    def said(self) -> str:
        """Its first error:/failed: line, else its last line: what a note quotes."""
        found = self.lines("error:") + self.lines("failed:") or self.stderr.strip().splitlines()[-1:] or [""]
        return found[0][:160]


@dataclass
class Tally:
    trials: int = 0
    tracebacks: int = 0
    lost: int = 0
    wrong: int = 0
    breaks: int = 0
    notes: list[str] = field(default_factory=list)

    def saw(self, finished: Finished, what: str) -> None:
        if finished.traceback:
            self.tracebacks += 1
            self.notes.append(f"{what}: traceback")

    def lost_checkpoint(self, note: str) -> None:
        self.lost += 1
        self.notes.append(note)

    def silently_wrong(self, note: str) -> None:
        self.wrong += 1
        self.notes.append(note)

    def broke(self, note: str) -> None:
        self.breaks += 1
        self.notes.append(note)

    @property
    def failures(self) -> int:
        return self.tracebacks + self.lost + self.wrong + self.breaks

    def add(self, other: Tally) -> None:
        self.trials += other.trials
        self.tracebacks += other.tracebacks
        self.lost += other.lost
        self.wrong += other.wrong
        self.breaks += other.breaks
        self.notes += other.notes


def expect_exit(tally: Tally, finished: Finished, what: str, code: int) -> bool:
    """Count a traceback; a different exit code (or a hang) is a break. True when the code is `code`."""
    tally.saw(finished, what)
    if finished.code == code:
        return True
    got = "hung" if finished.code is None else f"exit {finished.code}"
    tally.broke(f"{what}: {got}, expected {code} ({finished.said()})")
    return False


# ------------------------------------------------------------------------------------------------
# Child processes


class Watched:
    """A `tdiff` child in a session (process group) of its own, its stderr lines collected as they come."""

    def __init__(self, command: list[str], env: dict, cwd: Path):
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    def printed(self, wanted: Callable[[str], bool]) -> bool:
        return any(wanted(line) for line in list(self.lines))

    @property
    def ended(self) -> bool:
        """Exited, and all its stderr read."""
        return self.process.poll() is not None and not self.reader.is_alive()

    def wait_for(self, wanted: Callable[[str], bool]) -> bool:
        """Until a stderr line is `wanted`; False when the child ends (or hangs) first."""
        return first_to_print([self], wanted) is self

    def send(self, signum: int) -> None:
        """To the whole group, as a scheduler or a closing terminal sends it."""
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass  # the group has already ended

    def finish(self) -> Finished:
        try:
            code = self.process.wait(COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.process.wait()
            code = None
        self.reader.join()
        return Finished(code, "".join(self.lines))


def first_to_print(children: list[Watched], wanted: Callable[[str], bool]) -> Watched | None:
    """The first child with a `wanted` stderr line; None when all end (or hang) without one."""
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while time.monotonic() < deadline and not all(child.ended for child in children):
        for child in children:
            if child.printed(wanted):
                return child
        time.sleep(0.01)
    return next((child for child in children if child.printed(wanted)), None)


@dataclass(frozen=True)
class RunSettings:
    """Data and training flags of a kind of run, and the fault-free reference run made with them."""

    data: Path
    steps: int
    save_every: int
    workers: int
    reference: Path

    def flags(self) -> list[str]:
        return [
            *COMMON_FLAGS,
            "--data",
            str(self.data),
            "--steps",
            str(self.steps),
            "--set",
            f"train.save_every={self.save_every}",
            "--num-workers",
            str(self.workers),
        ]

    def resume_flags(self) -> list[str]:
        return ["--cpu", "--num-workers", str(self.workers)]  # run.json keeps neither

    @property
    def final(self) -> str:
        return step_name(self.steps)

    @property
    def previous(self) -> str:
        return step_name(self.steps - self.save_every)

    def final_difference(self, run: Path) -> str | None:
        """None when `run`'s final checkpoint holds the reference's tensors bit for bit, else what differs."""
        return checkpoint_difference(self.reference / CHECKPOINTS / self.final, run / CHECKPOINTS / self.final)


@dataclass(frozen=True)
class Bench:
    work: Path
    env: dict
    npz: RunSettings  # the checkpoint, disk and concurrency scenarios
    folder: RunSettings  # the signal scenario
    seed: int

    def tdiff(self, *args: str, cwd: Path | None = None) -> Finished:
        return self.command([sys.executable, "-m", "tdiff", *args], cwd)

    def command(self, command: list[str], cwd: Path | None = None) -> Finished:
        try:
            done = subprocess.run(
                command,
                cwd=cwd or self.work,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                timeout=COMMAND_TIMEOUT,
            )
        except subprocess.TimeoutExpired as e:
            return Finished(None, e.stderr or "")
        return Finished(done.returncode, done.stderr)

    def start(self, *args: str, cwd: Path | None = None) -> Watched:
        return Watched([sys.executable, "-m", "tdiff", *args], self.env, cwd or self.work)

    def resume(self, settings: RunSettings, *where: str) -> Finished:
        """`tdiff train --resume RUN` (`where`: RUN, or --out RUN)."""
        return self.tdiff("train", "--resume", *where, *settings.resume_flags())

    def reference_samples(self, kind: str) -> Path:
        return self.work / f"reference-samples-{kind}" / "samples.npz"


def child_env(work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TDIFF_DEBUG"}  # failures as one line, not raised
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"  # one core per child: --jobs trials share the machine
    env["HF_HOME"] = str(work / "hf")  # no user accelerate configuration
    return env


# ------------------------------------------------------------------------------------------------
# Checkpoints, samples and run folders as files


def step_name(step: int) -> str:
    return f"{step:08d}"


def step_numbers(run: Path) -> list[int]:
    """The run's finished checkpoint folders (numeric names), oldest first."""
    root = run / CHECKPOINTS
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.is_dir() else []


def latest_pointer(run: Path) -> str | None:
    pointer = run / CHECKPOINTS / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def read_checkpoint(step_dir: Path) -> dict[str, dict]:
    """file -> {tensor name: tensor} for the three files, with safetensors alone; raises if one is damaged
    or its metadata's step is not the folder's."""
    from safetensors import safe_open

    files = {}
    for name in CHECKPOINT_FILES:
        with safe_open(str(step_dir / name), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
            if step != str(int(step_dir.name)):
                raise ValueError(f"{name}: metadata step {step}")
            files[name] = {key: f.get_tensor(key) for key in f.keys()}
    return files


def loads_cleanly(step_dir: Path) -> bool:
    try:
        read_checkpoint(step_dir)
    except Exception:  # whatever the damage, the checkpoint is not loadable
        return False
    return True


def same_bits(a, b) -> bool:
    import torch

    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def checkpoint_difference(reference: Path, candidate: Path) -> str | None:
    """None when the candidate's three files hold the reference's tensors bit for bit, else what differs."""
    if not candidate.is_dir():
        return f"no checkpoint {candidate.name}"
    try:
        theirs = read_checkpoint(candidate)
    except Exception as e:  # whatever the damage
        return f"checkpoint {candidate.name} unreadable ({str(e)[:80]})"
    ours = read_checkpoint(reference)
    differing = []
    for name in CHECKPOINT_FILES:
        if ours[name].keys() != theirs[name].keys():
            differing.append(f"{name} has other tensors")
            continue
        changed = [key for key in ours[name] if not same_bits(ours[name][key], theirs[name][key])]
        if changed:
            differing.append(f"{name} differs in {len(changed)} tensors")
    return f"checkpoint {candidate.name}: " + ", ".join(differing) if differing else None


def samples_equal(a: Path, b: Path) -> bool:
    import numpy as np

    if not (a.is_file() and b.is_file()):
        return False
    with np.load(a) as x, np.load(b) as y:
        return x.files == y.files and all(x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x.files)


def temporaries(run: Path) -> list[str]:
    """Names tdiff gives files and folders while it writes them: `.NAME.tmp`."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp"))


def logged_steps(run: Path) -> list[int] | None:
    """The steps of metrics.jsonl's training records; None when a line is not JSON."""
    try:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    return [r["step"] for r in records if "loss" in r]


def training_seconds(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_seconds"]


def copy_of_reference(settings: RunSettings, destination: Path) -> Path:
    shutil.copytree(settings.reference, destination)
    return destination


def flip_byte(path: Path, region: str, rng: random.Random) -> None:
    """Flip the lowest bit of a random byte of the JSON header or of the tensor data."""
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON, data
    start, end = (8, header_end) if region == "header" else (header_end, len(data))
    position = rng.randrange(start, end)
    data[position] ^= 0x01
    path.write_bytes(data)


# ------------------------------------------------------------------------------------------------
# Checks shared by the scenarios


def expect_reference(tally: Tally, finished: Finished, run: Path, settings: RunSettings, what: str) -> None:
    """`what` must exit 0 leaving the reference's final checkpoint; exit 0 with another is silently wrong."""
    if not expect_exit(tally, finished, what, 0):
        return
    difference = settings.final_difference(run)
    if difference:
        tally.silently_wrong(f"{what}: exit 0 but {difference}")


def expect_kept(tally: Tally, run: Path, step: str, fault: str) -> None:
    if not loads_cleanly(run / CHECKPOINTS / step):
        tally.lost_checkpoint(f"checkpoint {step}, finished before {fault}, is gone or unloadable")


def check_stopped_run(tally: Tally, run: Path, finished: Finished, newest_before: int | None) -> None:
    """After a stop signal: nothing finished before it lost, and a loadable checkpoint at the step reached
    that `latest` names."""
    steps = step_numbers(run)
    loadable = [s for s in steps if loads_cleanly(run / CHECKPOINTS / step_name(s))]
    if newest_before is not None and not any(s >= newest_before for s in loadable):
        tally.lost_checkpoint(
            f"checkpoint {step_name(newest_before)}, finished before the signal, is gone "
            "or unloadable and nothing newer loads"
        )
    unloadable = sorted(set(steps) - set(loadable))
    if unloadable:
        tally.broke(f"unloadable checkpoint folder {step_name(unloadable[-1])} after the signal")
    reached = max(map(step_of, finished.stderr.splitlines()), default=0)
    if not loadable or loadable[-1] != reached:
        newest = step_name(loadable[-1]) if loadable else "none"
        tally.broke(f"newest loadable checkpoint {newest}, but the run reached step {reached}")
    elif latest_pointer(run) != step_name(loadable[-1]):
        tally.broke(f"checkpoints/latest names {latest_pointer(run)}, not the newest {step_name(loadable[-1])}")


def expect_refusal(tally: Tally, finished: Finished, what: str, damaged: str, samples: Path, reference: Path) -> None:
    """A command that read a damaged file: exit 2 with one error: line naming it."""
    if finished.code == 0:
        tally.saw(finished, what)
        if samples_equal(samples, reference):
            tally.broke(f"{what}: exit 0, the damage went unnoticed")
        else:
            tally.silently_wrong(f"{what}: exit 0 with samples that differ from the reference")
    elif expect_exit(tally, finished, what, 2):
        errors = finished.lines("error:")
        if len(errors) != 1 or damaged not in errors[0]:
            tally.broke(f"{what}: {len(errors)} error: lines, expected one naming {damaged}")


def expect_reference_samples(tally: Tally, finished: Finished, what: str, samples: Path, reference: Path) -> None:
    if expect_exit(tally, finished, what, 0) and not samples_equal(samples, reference):
        tally.silently_wrong(f"{what}: exit 0 with samples that differ from the reference")


# ------------------------------------------------------------------------------------------------
# The scenarios: each trial returns its Tally


def step_of(line: str) -> int:
    """K of a "step K ..." status line, else 0."""
    found = re.match(r"step (\d+)\b", line)
    return int(found.group(1)) if found else 0


def signal_trial(bench: Bench, index: int, signum: int, after_step: int, delay: float) -> Tally:
    tally = Tally(trials=1)
    settings, name = bench.folder, signal.Signals(signum).name
    run = bench.work / f"signal-{index:02d}"
    child = bench.start("train", *settings.flags(), "--out", str(run))
    if not child.wait_for(lambda line: step_of(line) >= after_step):
        ended = child.finish()
        tally.saw(ended, "train")
        tally.broke(f"train ended before step {after_step}: exit {ended.code} ({ended.said()})")
        return tally
    time.sleep(delay)
    numbers = step_numbers(run)  # a finished checkpoint folder has its final name
    ended_first = child.process.poll() is not None
    child.send(signum)
    stopped = child.finish()
    if ended_first:
        tally.notes.append(f"the run ended before the {name} (a void trial)")
    else:
        expect_exit(tally, stopped, f"train stopped by {name}", 128 + signum)
    check_stopped_run(tally, run, stopped, numbers[-1] if numbers else None)
    where = ["--out", str(run)] if index % 2 else [str(run)]
    expect_reference(tally, bench.resume(settings, *where), run, settings, "resume")
    return tally


def shared_out_trial(bench: Bench) -> Tally:
    tally = Tally(trials=1)
    settings, run = bench.npz, bench.work / "shared-out"
    children = [bench.start("train", *settings.flags(), "--out", str(run)) for _ in range(2)]
    holder = first_to_print(children, lambda line: step_of(line) > 0)
    if holder is None:
        for child in children:
            expect_exit(tally, child.finish(), "train (ended before any step)", 0)
        return tally
    holder.send(signal.SIGSTOP)  # it holds the folder: keep it holding until the other has tried
    other = children[1 - children.index(holder)].finish()
    holder.send(signal.SIGCONT)
    if not expect_exit(tally, holder.finish(), "the run that trained first", 0):
        return tally
    if other.code == 0:
        tally.saw(other, "the other run")
        tally.silently_wrong("both runs exited 0 after training into one folder")
    elif expect_exit(tally, other, "the other run", 2):
        errors = other.lines("error:")
        if not (len(errors) == 1 and re.search(rf"\b{holder.pid}\b", errors[0]) and socket.gethostname() in errors[0]):
            tally.broke(
                f"the other run: {len(errors)} error: lines, expected one naming the holder's PID and "
                f"host ({other.said()})"
            )
    difference = settings.final_difference(run)
    if difference:
        tally.silently_wrong(f"the winner's {difference}")
    if logged_steps(run) != logged_steps(settings.reference):
        tally.silently_wrong("the winner's metrics.jsonl differs from the reference's")
    if (run / "config.toml").read_bytes() != (settings.reference / "config.toml").read_bytes():
        tally.silently_wrong("the winner's config.toml differs from the reference's")
    return tally


def default_dirs_trial(bench: Bench, pairs: int) -> Tally:
    """Pairs of runs without --out, again while the two of a pair name their folders in different seconds."""
    tally = Tally()
    for pair in range(pairs):
        tally.trials += 1
        runs = default_dirs_pair(bench, tally, bench.work / f"default-dirs-{pair}")
        stamps = {m.group(0) for run in runs for m in [re.search(r"\d{8}-\d{6}", run.name)] if m}
        if len(stamps) < 2:
            return tally
    tally.notes.append(f"the runs of all {pairs} pairs started in different seconds: the name collision went untested")
    return tally


def default_dirs_pair(bench: Bench, tally: Tally, folder: Path) -> list[Path]:
    """Two runs started at once in `folder` without --out; returns the run folders they made."""
    settings = bench.npz
    folder.mkdir()
    children = [bench.start("train", *settings.flags(), cwd=folder) for _ in range(2)]
    exited_0 = [expect_exit(tally, child.finish(), "train without --out", 0) for child in children]
    runs = sorted((folder / "runs").glob("tiny-digits-*"))
    if all(exited_0) and len(runs) < 2:
        tally.silently_wrong(f"both runs exited 0 but made {len(runs)} run folder(s): {[r.name for r in runs]}")
    for run in runs:
        difference = settings.final_difference(run)
        if difference and all(exited_0):
            tally.silently_wrong(f"{run.name}: {difference}")
    return runs


def stale_lock_trial(bench: Bench) -> Tally:
    tally = Tally(trials=1)
    settings, run = bench.npz, bench.work / "stale-lock"
    child = bench.start("train", *settings.flags(), "--out", str(run))
    if not child.wait_for(lambda line: line.startswith("checkpoint ")):
        ended = child.finish()
        tally.saw(ended, "train")
        tally.broke(f"train ended before its first checkpoint: exit {ended.code} ({ended.said()})")
        return tally
    child.send(signal.SIGKILL)
    tally.saw(child.finish(), "train killed by SIGKILL")
    expect_kept(tally, run, step_name(settings.save_every), "the SIGKILL")
    resumed = bench.resume(settings, str(run))
    if resumed.code == 0 and not re.search(rf"\b{child.pid}\b", resumed.stderr):
        tally.broke(f"resume took over the lock without naming the dead PID {child.pid}")
    expect_reference(tally, resumed, run, settings, "resume after SIGKILL")
    return tally


def tmpfs_works(probe: Path) -> bool:
    """Root, and `mount -t tmpfs` succeeds (not in most CI containers)."""
    if os.geteuid() != 0:
        return False
    probe.mkdir()
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode
        == 0
    )
    if mounted:
        subprocess.run(["umount", str(probe)], check=True)
    probe.rmdir()
    return mounted


def checkpoint_bytes(step_dir: Path) -> int:
    return sum((step_dir / name).stat().st_size for name in CHECKPOINT_FILES)


def disk_full_trial(bench: Bench, tmpfs: bool) -> Tally:
    tally = Tally(trials=1)
    settings, disk = bench.npz, bench.work / "disk-full"
    run = disk / "run"
    size = checkpoint_bytes(settings.reference / CHECKPOINTS / settings.final)
    disk.mkdir()
    if tmpfs:  # room for one checkpoint and the run's small files, not for a second checkpoint
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2 // 1024}k", "tmpfs", str(disk)], check=True)
    try:
        arguments = ["train", *settings.flags(), "--out", str(run)]
        full = (
            bench.tdiff(*arguments)
            if tmpfs
            else bench.command([sys.executable, "-c", INJECT_ENOSPC, str(run), *arguments])
        )
        if full.code == 0:
            tally.silently_wrong("train exited 0 although a checkpoint could not be written")
        elif expect_exit(tally, full, "train on a full disk", 1) and len(full.lines("failed:")) != 1:
            tally.broke(f"train on a full disk: {len(full.lines('failed:'))} failed: lines, expected one")
        left = temporaries(run)
        if left:
            tally.broke(f"temporary files left under RUN: {', '.join(left[:3])}")
        expect_kept(tally, run, step_name(settings.save_every), "the disk filled up")
        if tmpfs:
            subprocess.run(["mount", "-o", f"remount,size={size * 8 // 1024}k", str(disk)], check=True)
        expect_reference(tally, bench.resume(settings, str(run)), run, settings, "resume with room again")
    finally:
        if tmpfs:
            if run.is_dir():  # for --keep: the tmpfs and its files go
                shutil.copytree(run, bench.work / "disk-full-run")
            subprocess.run(["umount", str(disk)], check=True)
    return tally


def flip_trial(bench: Bench, file: str, region: str) -> Tally:
    tally = Tally(trials=1)
    settings = bench.npz
    run = copy_of_reference(settings, bench.work / f"flip-{file.split('.')[0]}-{region}")
    newest = run / CHECKPOINTS / settings.final
    flip_byte(newest / file, region, random.Random(f"{bench.seed}-{file}-{region}"))
    for reads, what, extra in (("ema", "sample (EMA)", []), ("model", "sample --no-ema", ["--no-ema"])):
        out = bench.work / f"{run.name}-samples-{reads}"
        sampled = bench.tdiff("sample", str(run), *SAMPLE_FLAGS, *extra, "--out", str(out))
        if file == f"{reads}.safetensors":
            expect_refusal(
                tally, sampled, what, f"{newest.name}/{file}", out / "samples.npz", bench.reference_samples(reads)
            )
        else:
            expect_reference_samples(
                tally, sampled, f"{what} (its file undamaged)", out / "samples.npz", bench.reference_samples(reads)
            )
    resumed = bench.resume(settings, str(run))
    if resumed.code == 0 and not any(newest.name in line for line in resumed.lines("warning:")):
        tally.broke(f"resume gave no warning naming the damaged checkpoint {newest.name}")
    expect_reference(tally, resumed, run, settings, "resume")
    expect_kept(tally, run, settings.previous, "the damage")
    return tally


def truncate_trial(bench: Bench, file: str) -> Tally:
    tally = Tally(trials=1)
    settings = bench.npz
    run = copy_of_reference(settings, bench.work / f"truncated-{file.split('.')[0]}")
    path = run / CHECKPOINTS / settings.final / file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_reference(tally, bench.resume(settings, str(run)), run, settings, "resume")
    expect_kept(tally, run, settings.previous, "the damage")
    return tally


# ------------------------------------------------------------------------------------------------
# Setup, plan, table


def write_digits(folder: Path) -> tuple[Path, Path]:
    """64 digits as 16x16 RGB uint8: an .npz (images, labels) and a folder of PNGs per class."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:64] * 16).clip(0, 255).astype(np.uint8).repeat(2, axis=1).repeat(2, axis=2)
    images = np.repeat(images[..., None], 3, axis=3)
    labels = digits.target[:64]
    npz, pngs = folder / "digits.npz", folder / "digits"
    folder.mkdir(parents=True)
    np.savez(npz, images=images, labels=labels)
    for i, (image, label) in enumerate(zip(images, labels)):
        (pngs / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(pngs / str(label) / f"{i:03d}.png")
    return npz, pngs


def make_references(bench: Bench, pool: ThreadPoolExecutor) -> None:
    """The fault-free runs and samples every trial is compared with; exits if one fails."""

    def reference_run(settings: RunSettings) -> Finished:
        return bench.tdiff("train", *settings.flags(), "--out", str(settings.reference))

    def reference_sample(kind: str) -> Finished:
        extra = ["--no-ema"] if kind == "model" else []
        return bench.tdiff(
            "sample",
            str(bench.npz.reference),
            *SAMPLE_FLAGS,
            *extra,
            "--out",
            str(bench.reference_samples(kind).parent),
        )

    runs = list(pool.map(reference_run, (bench.npz, bench.folder)))
    samples = list(pool.map(reference_sample, ("ema", "model"))) if runs[0].code == 0 else []
    for finished in runs + samples:
        if finished.code != 0:
            sys.exit(f"the fault-free reference failed (exit {finished.code}):\n{finished.stderr[-3000:]}")


def plan(bench: Bench, args) -> list[tuple[str, str, Callable[[], Tally]]]:
    """(scenario, trial label, trial) for every trial, the slowest scenarios first."""
    steps = bench.folder.steps
    step_seconds = training_seconds(bench.folder.reference) / steps
    rng = random.Random(bench.seed)
    trials = []
    for i in range(args.trials):
        signum = SIGNAL_CYCLE[i % len(SIGNAL_CYCLE)]
        # The last steps are left out: a signal during the final checkpoint may rightly end the run with 0.
        after, delay = (1, 0.0) if i == 0 else (rng.randint(1, steps - 3), rng.uniform(0, step_seconds))
        label = f"{signal.Signals(signum).name} {delay:.3f} s after step {after}"
        trials.append((SIGNALS, label, lambda i=i, s=signum, k=after, d=delay: signal_trial(bench, i, s, k, d)))
    flips = (
        [("model.safetensors", "data"), ("ema.safetensors", "header"), ("state.safetensors", "data")]
        if args.quick
        else [(f, r) for f in CHECKPOINT_FILES for r in ("data", "header")]
    )
    for file, region in flips:
        trials.append((FLIPPED, f"{file}, {region}", lambda f=file, r=region: flip_trial(bench, f, r)))
    for file in ["state.safetensors"] if args.quick else CHECKPOINT_FILES:
        trials.append((TRUNCATED, file, lambda f=file: truncate_trial(bench, f)))
    tmpfs = tmpfs_works(bench.work / "tmpfs-probe")
    trials += [
        (SHARED_OUT, "", lambda: shared_out_trial(bench)),
        (DEFAULT_DIRS, "", lambda: default_dirs_trial(bench, pairs=2 if args.quick else 3)),
        (STALE_LOCK, "", lambda: stale_lock_trial(bench)),
        (DISK_FULL_TMPFS if tmpfs else DISK_FULL_FSYNC, "", lambda: disk_full_trial(bench, tmpfs)),
    ]
    return trials


def summarise_notes(notes: list[str], work: Path) -> str:
    counted = Counter(note.replace(f"{work}/", "") for note in notes).most_common()
    shown = [note if n == 1 else f"{note} (x{n})" for note, n in counted[:4]]
    return "; ".join(shown) + (f"; +{len(counted) - 4} more" if len(counted) > 4 else "")


def print_table(title: str, tallies: dict[str, Tally], work: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("scenario", no_wrap=True, min_width=max(map(len, tallies)))
    for header in ("trials", "tracebacks", "lost checkpoints", "silently wrong", "contract breaks"):
        table.add_column(header, justify="right")
    table.add_column("notes", overflow="fold")
    for scenario, t in tallies.items():
        table.add_row(
            scenario,
            str(t.trials),
            str(t.tracebacks),
            str(t.lost),
            str(t.wrong),
            str(t.breaks),
            summarise_notes(t.notes, work),
        )
    Console(width=240).print(table)


def run_trial(trial: tuple[str, str, Callable[[], Tally]], work: Path) -> Tally:
    """One trial; its notes go to stderr as it ends."""
    scenario, label, run = trial
    tally = run()
    said = "; ".join(tally.notes).replace(f"{work}/", "") or "ok"
    print(f"{scenario}{' / ' + label if label else ''}: {said}", file=sys.stderr, flush=True)
    return tally


def run_all(work: Path, args) -> bool:
    """Every scenario in `work`; prints the table and returns True when nothing failed."""
    began = time.monotonic()
    npz, pngs = write_digits(work / "data")
    folder_steps = 20 if args.quick else 40
    bench = Bench(
        work,
        child_env(work),
        npz=RunSettings(npz, steps=12, save_every=4, workers=0, reference=work / "reference-npz"),
        folder=RunSettings(pngs, steps=folder_steps, save_every=5, workers=2, reference=work / "reference-folder"),
        seed=args.seed,
    )
    with ThreadPoolExecutor(args.jobs) as pool:
        make_references(bench, pool)
        trials = plan(bench, args)
        results = list(pool.map(lambda trial: run_trial(trial, work), trials))
    tallies = {scenario: Tally() for scenario in SCENARIOS if any(s == scenario for s, _, _ in trials)}
    for (scenario, _, _), tally in zip(trials, results):
        tallies[scenario].add(tally)
    print_table(f"tdiff fault injection: tiny preset on the CPU, {time.monotonic() - began:.0f} s", tallies, work)
    return not any(t.failures for t in tallies.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, help="Trials of the signal scenario (default 10; 2 with --quick).")
    parser.add_argument(
        "--quick", action="store_true", help="Fewest trials and steps: 2 signal trials, 3 flipped bytes, 1 truncation."
    )
    parser.add_argument("--keep", type=Path, metavar="DIR", help="Work in DIR (new or empty) and keep it.")
    parser.add_argument("--jobs", type=int, default=2, help="Trials at a time (default 2).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the signal moments and flipped bytes.")
    args = parser.parse_args()
    args.trials = args.trials or (2 if args.quick else 10)
    if args.keep is not None:
        if args.keep.exists() and any(args.keep.iterdir()):
            parser.error(f"--keep {args.keep}: not empty")
        args.keep.mkdir(parents=True, exist_ok=True)
        passed = run_all(args.keep.resolve(), args)
    else:
        with tempfile.TemporaryDirectory(prefix="tdiff-faults-") as work:
            passed = run_all(Path(work), args)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
