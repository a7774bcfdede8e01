"""Experiment trackers (`tdiff train --log-with`): accelerate's tracker API, mirroring metrics.jsonl.

metrics.jsonl stays the source of truth: `record_metrics` appends a record there first, then logs
it to every tracker at the record's step. Only rank 0 logs (accelerate's `log` is main-process only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tdiff.config import Config, to_dict
from tdiff.errors import UserError
from tdiff.run import RunDir

if TYPE_CHECKING:
    from accelerate import Accelerator


TRACKER_PROJECT = "tdiff"  # the project name every tracker files the run under (wandb project, ...)
TRACKERS_DIR = "trackers"  # RUN/trackers/: the trackers' local files (TensorBoard: RUN/trackers/tdiff/)
# What trackers get of an eval record; its settings stay in the file.
EVAL_METRICS = ("fid", "kid", "kid_x1e4", "fid_float64", "kid_float64")


def known_trackers() -> list[str]:
    """The tracker names the installed accelerate knows (its LoggerType, less "all")."""
    from accelerate.utils import LoggerType

    return [t.value for t in LoggerType if t is not LoggerType.ALL]


def tracker_installed(name: str) -> bool:
    """Whether the package behind accelerate's tracker `name` is importable here."""
    from accelerate.tracking import get_available_trackers

    return name in {t.value for t in get_available_trackers()}


def check_trackers(names: tuple[str, ...]) -> None:
    """A one-line UserError for the first name accelerate does not know or whose package is missing:
    before anything starts (accelerate itself would skip a missing tracker without a word)."""
    known = known_trackers()
    for name in names:
        if name not in known:
            raise UserError(f"--log-with {name}: not a tracker accelerate knows; choose from {', '.join(known)}")
        if not tracker_installed(name):
            raise UserError(f'--log-with {name}: the {name} package is not installed; pip install "tdiff[{name}]"')


def tracker_config(config: Config, run_options: dict) -> dict[str, int | float | str | bool]:
    """The run's hyper-parameters and run-time options as one flat dict of scalars, which every tracker
    takes: {"model.width": 512, ..., "train.betas": "(0.9, 0.95)", "data": ..., "seed": 0, ...}."""
    flat = {f"{section}.{key}": value for section, values in to_dict(config).items() for key, value in values.items()}
    flat.update(run_options)
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in flat.items()}


def tracker_values(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: every number of a log record as train/<key>,
    the EVAL_METRICS of an eval record as eval/<key>. The record's step is the tracker's step."""
    if record.get("kind") == "eval":
        return {f"eval/{key}": record[key] for key in EVAL_METRICS if key in record}
    return {
        f"train/{key}": value
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def start_trackers(accelerator: Accelerator, run: RunDir, hyperparameters: dict, start_step: int) -> None:
    """Start the --log-with trackers (rank 0 only: accelerate's `init_trackers`) with the hyper-parameters.

    Local files go to RUN/trackers/. A resumed run writes on in the same TensorBoard folder, and
    TensorBoard drops the old events after `start_step`, as metrics.jsonl was cut back there."""
    if not accelerator.log_with:
        return
    accelerator.project_configuration.logging_dir = str(run.path / TRACKERS_DIR)
    accelerator.init_trackers(
        TRACKER_PROJECT,
        config=hyperparameters,
        init_kwargs={"tensorboard": {"purge_step": start_step + 1}} if start_step else None,
    )


def record_metrics(accelerator: Accelerator, run: RunDir, record: dict) -> None:
    """Append a record to metrics.jsonl, the source of truth, then mirror it to the trackers at its step."""
    run.append_metrics(record)
    accelerator.log(tracker_values(record), step=record["step"])


def end_trackers(accelerator: Accelerator, emit: Callable) -> None:
    """accelerate's `end_training` (close and flush the trackers) on every way out of a run with trackers.
    Its own failure is a warning: it never hides the run's result or the error that ended it."""
    if not accelerator.log_with:
        return
    try:
        accelerator.end_training()
    except Exception as e:  # noqa: BLE001 - a tracker that cannot flush or upload: metrics.jsonl has it all
        emit(
            "warning",
            {
                "message": f"closing the experiment trackers failed ({type(e).__name__}: {e}); "
                "metrics.jsonl holds every record"
            },
        )
