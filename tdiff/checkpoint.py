"""Checkpoints as data: safetensors files that describe and check themselves, written atomically.

A run directory holds `checkpoints/<step>/` with three files:
  model.safetensors  the trained weights         } resolved configuration (TOML) in the metadata,
  ema.safetensors    the EMA weights             } so `tdiff sample ema.safetensors` needs nothing else
  state.safetensors  optimiser moments, step, EMA update count (for exact resume)
and `checkpoints/latest`, a one-line pointer to the newest step (for people and scripts; tdiff
itself lists the step folders). A step folder is written under a temporary name, flushed to the
disk and renamed when complete (`tdiff.files.atomic_directory`), so a crash, a signal or a full
disk at any moment leaves the last finished checkpoint loadable.

Every file records a SHA-256 of its contents (metadata and tensors: names, dtypes, shapes, bytes)
in its metadata, and every load checks it: a flipped byte or a truncated file is a one-line
`UserError` naming the file, never weights that load "fine". Loading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tdiff.config import Config, loads, to_toml
from tdiff.errors import RunError, UserError
from tdiff.files import atomic_directory, atomic_write_text

FORMAT = "tdiff-checkpoint-2"  # 2: with a checksum; 1 (tdiff 0.x before it) is read without one
READABLE_FORMATS = (FORMAT, "tdiff-checkpoint-1")
CHECKSUM = "sha256"
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
FILES = ("model", "ema", "state")  # <kind>.safetensors in every step folder


def update_digest(digest, tensors: dict[str, torch.Tensor]) -> None:
    """Feed tensors (sorted by name: name, dtype, shape, raw bytes) into a hashlib digest."""
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def contents_sha256(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """The checksum a file records: its metadata (but the checksum) and its tensors."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != CHECKSUM}, sort_keys=True).encode())
    update_digest(digest, tensors)
    return digest.hexdigest()


def save_weights(path: Path, tensors: dict[str, torch.Tensor], config: Config, **metadata: str) -> None:
    """Save tensors as safetensors with the configuration, `metadata` (strings) and a checksum attached."""
    meta = {"format": FORMAT, "config": to_toml(config), **metadata}
    # safetensors refuses shared or non-contiguous storage; a copy per tensor is cheap next to I/O.
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    save_file(tensors, str(path), {**meta, CHECKSUM: contents_sha256(tensors, meta)})


@dataclass(frozen=True)
class Weights:
    tensors: dict[str, torch.Tensor]
    config: Config
    metadata: dict[str, str]
    path: Path


def load_weights(path: str | Path, device: str = "cpu") -> Weights:
    """Read and verify a tdiff safetensors file; anything else is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is damaged or not a safetensors file ({failure_reason(e)})") from None
    if metadata.get("format") not in READABLE_FORMATS or "config" not in metadata:
        raise UserError(f"{path} is a safetensors file but not a tdiff checkpoint (no tdiff metadata)")
    if metadata["format"] == FORMAT and metadata.get(CHECKSUM) != contents_sha256(tensors, metadata):
        raise UserError(f"{path} is damaged: its contents do not match the SHA-256 recorded when it was saved")
    tensors = {k: v.to(device) for k, v in tensors.items()} if str(device) != "cpu" else tensors
    return Weights(tensors, loads(metadata["config"], where=f"{path} metadata"), metadata, path)


def failure_reason(error: Exception) -> str:
    """The human part of an OSError or a safetensors error (which wraps the OS's message)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    found = re.search(r'message: "([^"]+)"', str(error))
    return found.group(1) if found else str(error)


def load_into(module: torch.nn.Module, weights: Weights) -> None:
    """Load weights into a module built from the same configuration; mismatch is a UserError."""
    try:
        module.load_state_dict(weights.tensors, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"{weights.path} does not fit its configuration: {first}") from None


def step_name(step: int) -> str:
    return f"{step:08d}"


def resolve(path: str | Path, ema: bool = True) -> Path:
    """A weights file from a file path, a step directory or a run directory (its newest step)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / CHECKPOINT_DIR).is_dir():
        step_dir = latest_step_dir(path)
        if step_dir is None:
            raise UserError(f"run {path} has no finished checkpoint yet")
        path = step_dir
    name = "ema.safetensors" if ema else "model.safetensors"
    if (path / name).is_file():
        return path / name
    raise UserError(f"{path}: not a checkpoint file, step directory or run directory")


def step_dirs(run_dir: Path) -> list[Path]:
    """The run's finished checkpoint folders, oldest first (temporary and set-aside ones excluded)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def latest_step_dir(run_dir: Path) -> Path | None:
    """The newest finished checkpoint folder of a run, or None."""
    found = step_dirs(run_dir)
    return found[-1] if found else None


def _optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], str]:
    """Flatten an optimiser state_dict into tensors plus JSON for the rest."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, json.dumps({"param_groups": groups, "scalars": scalars})


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: str) -> dict:
    info = json.loads(meta)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in info["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    step: int,
    config: Config,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict,
    keep_last: int = 0,
) -> Path:
    """Write checkpoints/<step>/ atomically, point `latest` at it, prune old steps.

    A failed write (full disk, permissions) is a RunError; nothing of it is left behind and the
    previous checkpoints are untouched."""
    root = run_dir / CHECKPOINT_DIR
    final = root / step_name(step)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with atomic_directory(final) as temp:
            info = {"step": str(step)}
            save_weights(temp / "model.safetensors", model.state_dict(), config, kind="model", **info)
            save_weights(temp / "ema.safetensors", ema.state_dict(), config, kind="ema", **info)
            tensors, optimizer_meta = _optimizer_tensors(optimizer.state_dict())
            save_weights(
                temp / "state.safetensors",
                tensors,
                config,
                kind="state",
                optimizer=optimizer_meta,
                extra=json.dumps(extra),
                **info,
            )
        atomic_write_text(root / LATEST, step_name(step) + "\n")
    except (OSError, SafetensorError) as e:
        raise RunError(
            f"could not write checkpoint {final} ({failure_reason(e)}); the previous checkpoint is untouched"
        ) from None
    _prune(root.parent, keep_last, keep=final)
    return final


def _prune(run_dir: Path, keep_last: int, keep: Path) -> None:
    if keep_last <= 0:
        return
    for old in step_dirs(run_dir)[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class TrainingState:
    step: int
    model: Weights
    ema: Weights
    optimizer: dict
    extra: dict
    path: Path  # the step folder


def load_checkpoint(step_dir: Path) -> TrainingState:
    """Everything needed to continue training from a checkpoint folder, each file verified; a damaged,
    missing or mismatched file is a one-line UserError naming it."""
    step_dir = Path(step_dir)
    loaded = {kind: load_weights(step_dir / f"{kind}.safetensors") for kind in FILES}
    for kind, weights in loaded.items():
        found = weights.metadata.get("kind")
        if found != kind:
            raise UserError(
                f"{weights.path} holds {found or 'unlabelled'} tensors, not the {kind} file of a "
                "checkpoint; was a file copied over it?"
            )
    steps = {weights.metadata.get("step") for weights in loaded.values()}
    if len(steps) != 1 or not str(next(iter(steps))).isdigit():
        raise UserError(f"{step_dir}: its files come from different steps ({', '.join(sorted(map(str, steps)))})")
    state = loaded["state"]
    try:
        optimizer = _optimizer_state(state.tensors, state.metadata["optimizer"])
        extra = json.loads(state.metadata.get("extra", "{}"))
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"{state.path}: the optimiser state in its metadata is unreadable ({e})") from None
    return TrainingState(int(state.metadata["step"]), loaded["model"], loaded["ema"], optimizer, extra, step_dir)


def newest_loadable(run_dir: Path) -> tuple[TrainingState | None, list[tuple[Path, str]]]:
    """The newest checkpoint of a run that loads and verifies, and the newer ones skipped with why."""
    skipped = []
    for step_dir in reversed(step_dirs(run_dir)):
        try:
            return load_checkpoint(step_dir), skipped
        except UserError as e:
            skipped.append((step_dir, str(e)))
    return None, skipped


def set_aside(step_dir: Path) -> Path:
    """Rename a damaged checkpoint folder to <step>.damaged[-k]: kept for inspection, out of every listing."""
    target = step_dir.with_name(step_dir.name + ".damaged")
    k = 1
    while target.exists():
        k += 1
        target = step_dir.with_name(f"{step_dir.name}.damaged-{k}")
    step_dir.rename(target)
    return target
