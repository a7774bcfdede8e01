"""Checkpoints as data: safetensors files that describe themselves, written atomically.

A run directory holds `checkpoints/<step>/` with three files:
  model.safetensors  the trained weights         } resolved configuration (TOML) in the metadata,
  ema.safetensors    the EMA weights             } so `tdiff sample ema.safetensors` needs nothing else
  state.safetensors  optimiser moments, step, EMA update count (for exact resume)
and `checkpoints/latest`, a one-line pointer to the newest complete step. A step directory is
written under a temporary name and renamed when complete, and `latest` is replaced atomically,
so a crash or Ctrl-C at any moment leaves the last finished checkpoint loadable. Loading never
unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tdiff.config import Config, loads, to_toml
from tdiff.errors import RunError, UserError
from tdiff.files import atomic_write_text

FORMAT = "tdiff-checkpoint-1"
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"


def save_weights(path: Path, tensors: dict[str, torch.Tensor], config: Config, **metadata: str) -> None:
    """Save tensors as safetensors with the configuration and `metadata` (strings) attached."""
    meta = {"format": FORMAT, "config": to_toml(config), **metadata}
    # safetensors refuses shared or non-contiguous storage; a copy per tensor is cheap next to I/O.
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, str(path), meta)


@dataclass(frozen=True)
class Weights:
    tensors: dict[str, torch.Tensor]
    config: Config
    metadata: dict[str, str]
    path: Path


def load_weights(path: str | Path, device: str = "cpu") -> Weights:
    """Read a tdiff safetensors file; anything else is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors checkpoint ({e})") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise UserError(f"{path} is a safetensors file but not a tdiff checkpoint (no tdiff metadata)")
    return Weights(tensors, loads(metadata["config"], where=f"{path} metadata"), metadata, path)


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
    """A weights file from a file path, a step directory or a run directory (its latest step)."""
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


def latest_step_dir(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    pointer = run_dir / CHECKPOINT_DIR / LATEST
    if not pointer.is_file():
        return None
    step_dir = run_dir / CHECKPOINT_DIR / pointer.read_text().strip()
    return step_dir if step_dir.is_dir() else None


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


def save_checkpoint(run_dir: Path, step: int, config: Config, model: torch.nn.Module,
                    ema: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict,
                    keep_last: int = 0) -> Path:
    """Write checkpoints/<step>/ atomically, point `latest` at it, prune old steps."""
    root = run_dir / CHECKPOINT_DIR
    final = root / step_name(step)
    tmp = root / f".{step_name(step)}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        info = {"step": str(step)}
        save_weights(tmp / "model.safetensors", model.state_dict(), config, kind="model", **info)
        save_weights(tmp / "ema.safetensors", ema.state_dict(), config, kind="ema", **info)
        tensors, optimizer_meta = _optimizer_tensors(optimizer.state_dict())
        save_weights(tmp / "state.safetensors", tensors, config, kind="state", optimizer=optimizer_meta,
                     extra=json.dumps(extra), **info)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, step_name(step) + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"could not write checkpoint {final} ({e.strerror or e}); "
                       f"the previous checkpoint is untouched") from None
    _prune(root, keep_last, keep=final)
    return final


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    if keep_last <= 0:
        return
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    for old in steps[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class TrainingState:
    step: int
    model: Weights
    ema: Weights
    optimizer: dict
    extra: dict


def load_checkpoint(step_dir: Path) -> TrainingState:
    """Everything needed to continue training from a checkpoint directory."""
    model = load_weights(step_dir / "model.safetensors")
    ema = load_weights(step_dir / "ema.safetensors")
    state = load_weights(step_dir / "state.safetensors")
    optimizer = _optimizer_state(state.tensors, state.metadata["optimizer"])
    return TrainingState(int(state.metadata["step"]), model, ema, optimizer,
                         json.loads(state.metadata.get("extra", "{}")))
