"""`tdiff train`: the training loop (reference spec §4, §7) around `tdiff.step.Trainer`.

Every random draw is a pure function of (seed, step) or (seed, stream position) — the data order and
augmentation in `tdiff.pipeline`, σ, noise, label dropout and TREAD routes in `tdiff.step`, network
dropout from the global RNG reseeded from (seed, step, rank) — so a resumed run continues
bit-identically and N processes with batch B compute the same examples as one process with batch
N·B. No RNG state needs saving.

The loop never waits for the device between steps: the loss stays on the device and is read (one
host sync, and on several processes one small all-gather) only on logging and saving steps, when a
stop signal arrived (one process), and every `STOP_CHECK_EVERY` steps (several processes, so that all
of them agree to stop at the same step). A non-finite loss or gradient norm is marked on the device
and found at the next read, which comes before every save: the run stops there with exit 1, naming
the step, and the checkpoint on disk stays the last good one.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tdiff import checkpoint as ckpt
from tdiff import hardware, tracking
from tdiff.config import Config, TrainConfig
from tdiff.data import KNOWN_SOURCES, ImageData, check_compatible, open_dataset
from tdiff.diffusion import Denoiser
from tdiff.errors import RunError, UserError
from tdiff.pipeline import STOP_SIGNALS, TrainingBatches
from tdiff.run import METRICS, RECORD, RunDir, RunRecord
from tdiff.sample import SamplingPlan, image_grid, inference_denoiser, sample_batch, save_png, spread_labels, to_uint8
from tdiff.step import StepReport, Trainer

# With several processes, the steps at which they agree whether a stop signal arrived (besides every
# logging and saving step): one all-gather of 4 numbers per 10 steps costs nothing measurable.
STOP_CHECK_EVERY = 10


@dataclass(frozen=True)
class RunOptions:
    """Run-time choices that are not part of the model's configuration."""

    data: str  # cifar10 | artbench10 | a folder | an .npz
    out: Path | None = None  # the run directory; None: a new one, runs/<name>-<date>-<time>
    name: str = "run"  # the default run directory's prefix, e.g. "d2s8i-cifar10"
    data_dir: Path = Path("data")  # where named datasets are downloaded / looked for
    seed: int = 0
    resume: bool = False  # continue from out's newest checkpoint that verifies
    mixed_precision: str = "no"  # no | fp16 | bf16
    cpu: bool = False  # force the CPU even when a GPU is present
    compile: bool = False  # torch.compile each distinct block (regional compilation)
    num_workers: int = 2  # DataLoader worker processes (file-backed data sets only)
    demo_n: int = 64  # images in each demo grid
    inception: Path | None = None  # Inception weights for train.eval_every (None: $TDIFF_INCEPTION, the cache)
    log_with: tuple[str, ...] = ()  # experiment trackers mirroring metrics.jsonl, by accelerate's names


@dataclass(frozen=True)
class TrainSummary:
    run_dir: Path
    step: int
    loss: float
    ema_loss: float
    images_per_second: float
    elapsed_seconds: float
    checkpoint: Path | None
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" / "SIGHUP" when interrupted
    process_index: int = 0  # under `accelerate launch` every process returns one; rank 0's reports


def resume_settings(run_dir: str | Path) -> tuple[Config, RunRecord]:
    """The configuration and run-time options a run was started with, for `RunOptions(resume=True)`:
    config.toml (checked complete), else the newest checkpoint's copy; and run.json."""
    run = RunDir.existing(run_dir)
    record = run.read_record()
    if record is None:
        raise UserError(
            f"--resume: {run.path} has no {RECORD} (it records the data and seed); was it made by tdiff train?"
        )
    config = run.read_config()
    if config is None:
        state, _ = ckpt.newest_loadable(run.path)
        if state is None:
            raise UserError(f"--resume: {run.path} has neither a config.toml nor a checkpoint that loads")
        config = state.model.config
    return config, record


def open_run(config: Config, options: RunOptions, emit: Callable) -> tuple[RunDir, ckpt.TrainingState | None]:
    """Create or reopen the run directory and lock it; on resume, load the newest checkpoint that verifies.

    Writes config.toml and run.json (a run started from Python resumes like one from the CLI) and cuts
    metrics.jsonl back to the step training continues from."""
    if options.out is None:
        run = RunDir.create_named(Path("runs"), f"{options.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    elif options.resume:
        run = RunDir.existing(options.out)
    else:
        run = RunDir.create(options.out)
    note = run.lock()
    try:
        if note:
            emit("warning", {"message": note})
        state = None
        if options.resume:
            state, notes = run.resume_state()
            for line in notes:
                emit("warning", {"message": line})
            saved = state.model.config
            for section in ("model", "sharing", "diffusion"):
                if getattr(saved, section) != getattr(config, section):
                    raise UserError(
                        f"--resume: the [{section}] settings differ from the run's checkpoint in "
                        f"{state.path}; resume without --preset/--set for that section"
                    )
        elif ckpt.latest_step_dir(run.path) is not None:
            raise UserError(f"{run.path} already holds a run; add --resume to continue it or choose another --out")
        # run.json first: it marks the folder as a run. On resume, changed settings become the run's.
        run.write_record(
            RunRecord(
                data=_portable_data(options.data),
                data_dir=str(options.data_dir.resolve()),
                seed=options.seed,
                mixed_precision=options.mixed_precision,
                log_with=options.log_with,
            )
        )
        run.write_config(config)
        for number in run.restart_metrics(state.step if state else 0):
            emit("warning", {"message": f"{run.path / METRICS} line {number} was torn or not JSON; dropped"})
    except BaseException:
        run.unlock()
        raise
    return run, state


def _portable_data(data: str) -> str:
    """A named dataset as is; a path absolute, so `--resume` and `tdiff eval RUN` work from any folder."""
    return data if data in KNOWN_SOURCES or not Path(data).exists() else str(Path(data).resolve())


class StopSignal:
    """Catches SIGINT, SIGTERM and SIGHUP (to this process or its whole group) so the current step can
    finish and a checkpoint be written."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------
# The loop


def open_training_data(config: Config, options: RunOptions) -> ImageData:
    data = open_dataset(options.data, options.data_dir, config.model.image_size)
    check_compatible(data, config.model.channels, config.model.num_classes)
    return data


def train(config: Config, options: RunOptions, on_event: Callable[[str, dict], None] | None = None) -> TrainSummary:
    """Train (or resume) a run; returns when train.steps is reached or a stop signal arrives."""
    from accelerate.utils import broadcast_object_list  # heavy; imported where used

    accelerator = _accelerator(options)
    main = accelerator.is_main_process
    emit = (on_event or _ignore) if main else _ignore  # one process reports
    warning = hardware.slow_precision_warning(accelerator.device, options.mixed_precision)
    if warning:
        emit("warning", {"message": warning})
    # Data first: a missing dataset should fail before any model is built.
    data = open_training_data(config, options)
    # In-training FID/KID: Inception and the reference now, so missing weights fail before any step.
    evaluator = prepare_evaluation(config, options, data, accelerator.device) if main else None
    run, state = open_run(config, options, emit) if main else (None, None)
    try:
        # Rank 0 chose the folder (a default name is claimed there) and the checkpoint; the others follow.
        chosen = broadcast_object_list([str(run.path) if main else None, str(state.path) if state else None])
        if not main:
            run = RunDir(chosen[0])
            state = ckpt.load_checkpoint(Path(chosen[1])) if chosen[1] else None
        trainer = Trainer(config, accelerator, options.seed, state, compile_blocks=options.compile)
        batches = _batches(trainer, data, config, options)
        _announce(trainer, config, options, run, emit)
        return _run_steps(trainer, batches, config, options, run, evaluator, emit)
    finally:
        tracking.end_trackers(accelerator, emit)
        if run is not None:
            run.unlock()


def _accelerator(options: RunOptions):
    """accelerate's Accelerator for the run: device, precision, processes, trackers (checked first)."""
    from accelerate import Accelerator  # heavy; imported where used

    tracking.check_trackers(options.log_with)
    # The run's folder is known only after open_run; start_trackers points the trackers' folder at it.
    return Accelerator(
        mixed_precision=options.mixed_precision,
        cpu=options.cpu,
        log_with=list(options.log_with) or None,
        project_dir=str(options.out or "runs"),
    )


def _batches(trainer: Trainer, data: ImageData, config: Config, options: RunOptions) -> TrainingBatches:
    """This process's micro-batches from the trainer's first step to train.steps."""
    t = config.train
    return TrainingBatches(
        data,
        options.seed,
        config.diffusion.augment_prob,
        trainer.device,
        t.batch_size,
        trainer.rank,
        trainer.world,
        t.grad_accum,
        trainer.start_step,
        t.steps,
        options.num_workers,
    )


def _announce(trainer: Trainer, config: Config, options: RunOptions, run: RunDir, emit: Callable) -> None:
    """The "start" event, and the trackers' run with its configuration."""
    emit(
        "start",
        {
            "step": trainer.start_step,
            "steps": config.train.steps,
            "world_size": trainer.world,
            "device": str(trainer.device),
            "global_batch": trainer.global_batch,
            "run_dir": str(run.path),
            "params": sum(p.numel() for p in trainer.net.parameters()),
        },
    )
    settings = {"data": _portable_data(options.data), "seed": options.seed, "mixed_precision": options.mixed_precision}
    tracking.start_trackers(trainer.accelerator, run, tracking.tracker_config(config, settings), trainer.start_step)


@dataclass(frozen=True)
class Due:
    """What the end of an optimiser step calls for."""

    signalled: bool  # a stop signal reached this process
    log: bool
    save: bool
    read: bool  # read the step's numbers back from the device (logging, saving, agreeing on a stop)


def due_at(train: TrainConfig, done: int, signalled: bool, world: int) -> Due:
    log = done % train.log_every == 0 or done == train.steps
    save = done % train.save_every == 0 or done == train.steps
    agree = signalled if world == 1 else done % STOP_CHECK_EVERY == 0  # processes agree on stops every so often
    return Due(signalled, log, save, log or save or agree)


def _run_steps(
    trainer: Trainer,
    batches: TrainingBatches,
    config: Config,
    options: RunOptions,
    run: RunDir,
    evaluator: Callable | None,
    emit: Callable,
) -> TrainSummary:
    """The loop: a step, then whatever is due at its end (read, log, demo, eval, save, stop)."""
    start = done = trainer.start_step
    report, last_checkpoint, stopped_by = None, None, None
    started = time.monotonic()
    window = (started, start)  # (time, step) of the last log line: images/s are over the window since
    hardware.reset_peak_memory(trainer.device)
    with StopSignal() as stop:
        for step in range(start, config.train.steps):
            trainer.step(step, batches.step(step))
            done = step + 1
            emit("step", {"step": done})
            due = due_at(config.train, done, stop.received is not None, trainer.world)
            fresh = trainer.read(stop_here=due.signalled) if due.read else None
            if fresh is not None:
                _stop_if_non_finite(fresh, done, run.path, last_checkpoint)
                report = fresh
            stopping = fresh is not None and fresh.stop_requested
            elapsed = trainer.elapsed_before + time.monotonic() - started
            if due.log or stopping:  # the step a signal stopped at is logged too
                window = _log(trainer, run, report, done, window, elapsed, emit)
            _side_jobs(trainer, config, options, run, evaluator, done, emit)
            if due.save or stopping:
                extra = {"elapsed_seconds": elapsed, "ema_loss": report.ema_loss, "seed": options.seed}
                last_checkpoint = save(trainer, run.path, config, done, extra)
                emit("checkpoint", {"step": done, "path": str(last_checkpoint)})
            if stopping:
                stopped_by = stop.received or "a signal on another process"
                break
    return _summary(trainer, run, (start, done), time.monotonic() - started, report, last_checkpoint, stopped_by, emit)


def _log(
    trainer: Trainer,
    run: RunDir,
    report: StepReport,
    done: int,
    window: tuple[float, int],
    elapsed: float,
    emit: Callable,
) -> tuple[float, int]:
    """One metrics.jsonl line (and the trackers'), images/s over the window since the last; the new window."""
    now = time.monotonic()
    rate = (done - window[1]) * trainer.global_batch / max(now - window[0], 1e-9)
    record = {
        "step": done,
        "loss": report.loss,
        "ema_loss": report.ema_loss,
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "images_per_second": rate,
        "elapsed_seconds": elapsed,
    }
    peak = hardware.peak_memory_mib(trainer.device)
    if peak is not None:
        record["peak_memory_mib"] = peak
    if trainer.accelerator.is_main_process:
        tracking.record_metrics(trainer.accelerator, run, record)
    emit("log", record)
    return now, done


def _side_jobs(
    trainer: Trainer,
    config: Config,
    options: RunOptions,
    run: RunDir,
    evaluator: Callable | None,
    done: int,
    emit: Callable,
) -> None:
    """The demo grid and the evaluation when due; either failing is a warning (`_optional`)."""
    t = config.train
    if t.demo_every and done % t.demo_every == 0 and trainer.accelerator.is_main_process:
        _optional(emit, f"demo grid at step {done}", lambda: _demo(trainer, config, options, run, done, emit))
    if evaluator is not None and done % t.eval_every == 0:
        _optional(emit, f"evaluation at step {done}", lambda: _evaluate(evaluator, trainer, done, run, emit))


def _demo(trainer: Trainer, config: Config, options: RunOptions, run: RunDir, done: int, emit: Callable) -> None:
    denoiser = inference_denoiser(trainer.ema_denoiser, options.mixed_precision)  # under the run's precision
    path = write_demo_grid(denoiser, config, options.demo_n, run.demo_path(done), trainer.device)
    emit("demo", {"step": done, "path": str(path)})


def _summary(
    trainer: Trainer,
    run: RunDir,
    steps: tuple[int, int],
    seconds: float,
    report: StepReport | None,
    last_checkpoint: Path | None,
    stopped_by: str | None,
    emit: Callable,
) -> TrainSummary:
    """What the run did in this call: steps start..done in `seconds`, its last numbers and checkpoint."""
    start, done = steps
    rate = (done - start) * trainer.global_batch / max(seconds, 1e-9)
    loss, ema_loss = (report.loss, report.ema_loss) if report else (float("nan"), float("nan"))
    summary = TrainSummary(
        run.path,
        done,
        loss,
        ema_loss,
        rate,
        trainer.elapsed_before + seconds,
        last_checkpoint,
        stopped_by,
        trainer.rank,
    )
    emit("end", summary.__dict__)
    return summary


def _ignore(kind: str, info: dict) -> None:
    """The event sink of processes that do not report."""


def _optional(emit: Callable, what: str, work: Callable[[], None]) -> None:
    """Run a side job of training (a demo grid, an evaluation); its failure is a warning, not the run's end."""
    try:
        work()
    except (KeyboardInterrupt, RunError):
        raise
    except Exception as e:  # noqa: BLE001 - a full disk, an out-of-memory, a bad Inception file: warn, train on
        emit("warning", {"message": f"{what} failed ({type(e).__name__}: {e}); training goes on"})


def _evaluate(evaluator: Callable, trainer: Trainer, step: int, run: RunDir, emit: Callable) -> None:
    record = evaluator(trainer.ema_denoiser, step)
    tracking.record_metrics(trainer.accelerator, run, record)
    emit("eval", record)


def _stop_if_non_finite(report: StepReport, done: int, out: Path, last_checkpoint: Path | None) -> None:
    if report.first_bad_step is None:
        return
    where = last_checkpoint or ckpt.latest_step_dir(out)
    raise RunError(
        f"non-finite loss or gradient norm at step {report.first_bad_step} (found at step {done}); "
        f"nothing saved after it. Last good checkpoint: {where or 'none yet'}"
    )


def save(trainer: Trainer, run_dir: Path, config: Config, step: int, extra: dict) -> Path | None:
    from accelerate.utils import gather_object

    accelerator = trainer.accelerator
    # DDP keeps every process's weights equal and rank 0 saves them for all: check that bit for bit,
    # and keep each process's digest in the checkpoint (extra["weights_sha256"], by rank).
    digests = gather_object([weights_digest(trainer.net.state_dict(), trainer.ema_net.state_dict())])
    if len(set(digests)) > 1:
        where = ckpt.latest_step_dir(run_dir)
        raise RunError(
            f"the {len(digests)} processes hold different weights at step {step} "
            f"({', '.join(d[:12] for d in digests)}); not saved. Last good checkpoint: "
            f"{where or 'none yet'}"
        )
    extra = {**extra, "weights_sha256": digests}
    accelerator.wait_for_everyone()
    path = None
    if accelerator.is_main_process:
        path = ckpt.save_checkpoint(
            run_dir,
            step,
            config,
            trainer.net,
            trainer.ema_net,
            trainer.optimizer,
            extra,
            keep_last=config.train.keep_last,
        )
    accelerator.wait_for_everyone()
    return path


def weights_digest(*state_dicts: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensor names, dtypes, shapes and raw bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for state in state_dicts:
        ckpt.update_digest(digest, state)
    return digest.hexdigest()


@torch.no_grad()
def write_demo_grid(denoiser: Denoiser, config: Config, n: int, path: Path, device) -> Path:
    """A grid of n EMA samples from fixed seeds 0..n-1 and evenly spread labels, written to `path`."""
    m = config.model
    labels = spread_labels(n, m.num_classes) if m.num_classes else None
    images = sample_batch(
        denoiser,
        SamplingPlan.from_config(config),
        list(range(n)),
        labels,
        (m.channels, m.image_size, m.image_size),
        m.num_classes,
        device,
    )
    save_png(image_grid(to_uint8(images)), path)
    return path


def prepare_evaluation(config: Config, options: RunOptions, data: ImageData, device) -> Callable | None:
    """(EMA denoiser, step) -> a metrics.jsonl eval record, when train.eval_every > 0; else None.

    The paper's protocol (k-diffusion's in-training evaluation): train.eval_n samples by DPM++(2M) SDE,
    eta 0, heun, 50 Karras steps, no guidance, uniform random labels, fixed seeds (the same noise at every
    evaluation), against train.eval_n un-augmented training images with k-diffusion's resize, unrounded
    samples and float32 FID/KID (float64 beside). The Inception weights and the reference features are
    loaded here, at the start of the run (the reference is cached in tdiff's cache folder, shared with
    `tdiff eval --protocol paper`).
    """
    if not config.train.eval_every:
        return None
    from tdiff import evaluate  # heavy and only needed here

    protocol = evaluate.PROTOCOLS["paper"]
    n = config.train.eval_n
    extractor = evaluate.load_inception(options.inception, device=device, resize=protocol.resize)
    reference = evaluate.training_reference(data, extractor, protocol, n)
    plan = evaluate.protocol_plan(protocol, config)

    def run(denoiser: Denoiser, step: int) -> dict:
        # Under the run's own autocast precision, as the reference evaluates its prepared EMA model.
        result = evaluate.evaluate_checkpoint(
            inference_denoiser(denoiser, options.mixed_precision),
            config,
            reference,
            extractor,
            protocol=protocol,
            plan=plan,
            n=n,
            seed=0,
            batch_size=max(config.train.batch_size, 200),
            device=device,
        )
        return evaluate.eval_record(step, {**result, "precision": options.mixed_precision}, protocol.name)

    return run
