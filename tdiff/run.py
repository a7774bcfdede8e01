"""A run directory: the one owner of every file of a training run.

    RUN/
      run.json        format marker and what the run was started with (data, data_dir, seed, precision)
      config.toml     the resolved configuration
      metrics.jsonl   one JSON object per logged step or evaluation
      checkpoints/    <step>/{model,ema,state}.safetensors and `latest` (tdiff.checkpoint)
      samples/        demo-<step>.png grids of EMA samples
      trackers/       the --log-with trackers' local files (TensorBoard events)
      .lock           held by the process that trains the run, for the run's whole life

`train`, `eval` and `compare` reach these files only through `RunDir`; every write goes through
`tdiff.files` (atomic, fsynced, the umask's mode) and every read of a damaged file is one line.

The lock is an advisory `flock` on RUN/.lock, which the kernel drops when its holder dies (even by
SIGKILL): a second run into the same folder is refused with the holder's PID and host, and a lock
left by a dead process is taken over with a message naming it. The file's text only says who holds
it; it is emptied on release, never deleted (deleting a lock file races with the next locker).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tdiff import checkpoint as ckpt
from tdiff.config import Config, loads, to_toml
from tdiff.errors import RunError, UserError
from tdiff.files import atomic_write_text, is_temporary

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked (lock() says so)
    fcntl = None

RUN_FORMAT = "tdiff-run-1"
RECORD, CONFIG, METRICS, LOCK, SAMPLES = "run.json", "config.toml", "metrics.jsonl", ".lock", "samples"


@dataclass(frozen=True)
class RunRecord:
    """run.json: what `--resume` and `tdiff eval RUN` reuse."""

    data: str  # cifar10 | artbench10 | an absolute folder or .npz path
    data_dir: str  # absolute
    seed: int
    mixed_precision: str
    log_with: tuple[str, ...] = ()  # experiment trackers (`--log-with`); absent from older run.json files


class RunDir:
    """The files of one run, at `path`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ----------------------------------------------------------------------------------------
    # Finding, creating and opening runs

    @staticmethod
    def is_run(path: str | os.PathLike) -> bool:
        """A folder tdiff made for a run: a run.json with tdiff's format marker, or config.toml beside
        checkpoints/ (also runs of older tdiff, and runs whose run.json was damaged)."""
        path = Path(path)
        if (path / CONFIG).is_file() and (path / ckpt.CHECKPOINT_DIR).is_dir():
            return True
        try:
            return json.loads((path / RECORD).read_bytes()).get("format") == RUN_FORMAT
        except (OSError, ValueError, AttributeError):
            return False

    @classmethod
    def create(cls, path: str | os.PathLike) -> RunDir:
        """The folder for a new run at `path`: made if absent; an existing one must be empty (but for the
        lock of a run killed before it wrote run.json) or be a run. Anything else (`--out .` in a
        project) is refused untouched."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {path}: a file, not a folder; choose another --out")
        if path.is_dir() and not cls.is_run(path):
            foreign = sorted(p.name for p in path.iterdir() if p.name != LOCK and not is_temporary(p))
            if foreign:
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                raise UserError(
                    f"--out {path}: the folder holds other files ({shown}) and is not a tdiff run; "
                    "choose a new or empty folder"
                )
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cannot create the run directory {path} ({e.strerror or e}); choose another --out"
            ) from None
        return cls(path)

    @classmethod
    def create_named(cls, parent: Path, name: str) -> RunDir:
        """A new, empty run folder `parent/name`, or `name-2`, `name-3`, ... if taken: `mkdir` is atomic,
        so runs started in the same second never share a folder."""
        try:
            parent.mkdir(parents=True, exist_ok=True)
            for k in range(1, 10_000):
                candidate = parent / (name if k == 1 else f"{name}-{k}")
                try:
                    candidate.mkdir()
                    return cls(candidate)
                except FileExistsError:
                    continue
        except OSError as e:
            raise UserError(f"cannot create a run directory under {parent} ({e.strerror or e}); pass --out") from None
        raise UserError(f"{parent} holds 10,000 runs named {name}-*; pass --out")

    @classmethod
    def existing(cls, path: str | os.PathLike) -> RunDir:
        path = Path(path)
        if not cls.is_run(path):
            raise UserError(f"{path} is not a tdiff run directory (no {RECORD}, or {CONFIG} with checkpoints/)")
        return cls(path)

    @classmethod
    def of_weights(cls, weights_file: Path) -> RunDir | None:
        """The run a weights file lies in (RUN/checkpoints/STEP/x.safetensors), if any."""
        run = Path(weights_file).resolve().parent.parent.parent
        return cls(run) if (run / ckpt.CHECKPOINT_DIR).is_dir() and cls.is_run(run) else None

    # ----------------------------------------------------------------------------------------
    # The lock

    def lock(self) -> str | None:
        """Hold the run's lock until `unlock` or the process's end; a held lock is a UserError naming
        its holder. Returns a note when a dead process's lock was taken over, else None."""
        path = self.path / LOCK
        if fcntl is None:
            return "this platform has no file locks: make sure one process at a time trains in " + str(self.path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"cannot create the lock {path} ({e.strerror or e}); choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(
                    f"{self.path} is in use by {self._holder(path, wait=True)}; one run directory "
                    "takes one run at a time: wait for it, stop it, or choose another --out"
                ) from None
            raise UserError(
                f"cannot lock {path} ({e.strerror or e}); this file system may not support "
                "locks: choose an --out on a local or NFS disk"
            ) from None
        previous = self._holder(path, wait=False)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._lock_fd = fd
        self._sweep_temporaries()
        return f"took over the lock of {self.path} from {previous}, which is gone" if previous else None

    def unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.ftruncate(self._lock_fd, 0)
        except OSError:
            pass  # a full or read-only disk: the kernel's lock is what counts, and it goes with close
        os.close(self._lock_fd)  # closing releases the flock
        self._lock_fd = None

    @staticmethod
    def _holder(path: Path, wait: bool) -> str | None:
        """'PID 123 on host (since ...)' from a lock file; a fresh holder may not have written it yet."""
        for _ in range(20 if wait else 1):
            try:
                info = json.loads(path.read_text())
                return f"PID {info['pid']} on {info['host']} (since {info['since']})"
            except (OSError, ValueError, KeyError, TypeError):
                if wait:
                    time.sleep(0.1)
        return "another process (it has not said which)" if wait else None

    def _sweep_temporaries(self) -> None:
        """Remove half-written files of killed writers (only ever called with the lock held)."""
        for folder in (self.path, self.path / ckpt.CHECKPOINT_DIR, self.path / SAMPLES):
            if folder.is_dir():
                for entry in folder.iterdir():
                    if is_temporary(entry):
                        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)

    # ----------------------------------------------------------------------------------------
    # Configuration and run.json

    def write_config(self, config: Config) -> None:
        self._write(self.path / CONFIG, to_toml(config))

    def read_config(self) -> Config | None:
        """config.toml, complete and valid; None when absent (the newest checkpoint holds a copy)."""
        path = self.path / CONFIG
        if not path.is_file():
            return None
        try:
            return loads(self._read_text(path), where=str(path), complete=True)
        except UserError as e:
            raise UserError(
                f"{e}: damaged or edited; complete it, or delete it to use the configuration "
                "stored in the newest checkpoint"
            ) from None

    def write_record(self, record: RunRecord) -> None:
        self._write(self.path / RECORD, json.dumps({"format": RUN_FORMAT, **asdict(record)}, indent=2) + "\n")

    def read_record(self) -> RunRecord | None:
        """run.json, or None when absent; a damaged one is a one-line UserError."""
        path = self.path / RECORD
        if not path.is_file():
            return None
        try:
            saved = json.loads(self._read_text(path))
            return RunRecord(
                data=str(saved["data"]),
                data_dir=str(saved["data_dir"]),
                seed=int(saved["seed"]),
                mixed_precision=str(saved.get("mixed_precision", "no")),
                log_with=tuple(str(name) for name in saved.get("log_with", [])),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"{path} is damaged ({type(e).__name__}: {e}); it should be a JSON object with data, "
                "data_dir, seed and mixed_precision"
            ) from None

    @staticmethod
    def _read_text(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path} is damaged: not UTF-8 text") from None
        except OSError as e:
            raise UserError(f"cannot read {path} ({e.strerror or e})") from None

    @staticmethod
    def _write(path: Path, text: str) -> None:
        try:
            atomic_write_text(path, text)
        except OSError as e:
            raise RunError(f"cannot write {path} ({e.strerror or e})") from None

    # ----------------------------------------------------------------------------------------
    # metrics.jsonl

    def append_metrics(self, record: dict) -> None:
        path = self.path / METRICS
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise RunError(
                f"cannot append to {path} ({e.strerror or e}); the last checkpoint is intact, "
                "resume with --resume once there is room"
            ) from None

    def read_metrics(self) -> tuple[list[dict], list[int]]:
        """The records of metrics.jsonl and the numbers of the lines skipped (torn by a kill, not JSON,
        not UTF-8, not an object)."""
        path = self.path / METRICS
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return [], []
        except OSError as e:
            raise UserError(f"cannot read {path} ({e.strerror or e})") from None
        records, skipped = [], []
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped.append(number)
        return records, skipped

    def restart_metrics(self, step: int) -> list[int]:
        """Keep only the records up to `step` (where training continues from), so a resumed run never
        logs a step twice; drops torn and undecodable lines. Returns the numbers of lines dropped as bad."""
        records, skipped = self.read_metrics()
        kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= step]
        if skipped or len(kept) != len(records) or (step == 0 and (self.path / METRICS).exists()):
            self._write(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in kept))
        return skipped

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    def resume_state(self) -> tuple[ckpt.TrainingState, list[str]]:
        """The newest checkpoint that loads and verifies, and notes on the newer ones set aside."""
        state, skipped = ckpt.newest_loadable(self.path)
        notes = []
        for step_dir, reason in skipped:
            aside = ckpt.set_aside(step_dir)
            notes.append(f"skipped checkpoint {step_dir.name}: {reason}; moved it to {aside}")
        if state is None:
            why = f"; the newest was set aside: {skipped[0][1]}" if skipped else ""
            raise UserError(f"--resume: {self.path} holds no finished checkpoint that loads{why}")
        if skipped:
            self._write(self.path / ckpt.CHECKPOINT_DIR / ckpt.LATEST, state.path.name + "\n")
            notes.append(f"resuming from {state.path.name}, the newest checkpoint that verifies")
        return state, notes

    def demo_path(self, step: int) -> Path:
        folder = self.path / SAMPLES
        folder.mkdir(exist_ok=True)
        return folder / f"demo-{ckpt.step_name(step)}.png"
