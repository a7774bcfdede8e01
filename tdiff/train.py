"""`tdiff train`: the training loop (reference spec §4, §7), one function read top to bottom.

Every random draw is a pure function of (seed, step) or (seed, stream position):
- the data order is an endless stream of per-epoch permutations, addressed by position;
- augmentation of the item at position p uses a generator seeded from (seed, p);
- σ, noise and label dropout for a step are drawn for the whole global batch from a generator
  seeded from (seed, step), and each process takes its own examples from that global batch;
- dropout inside the network uses the global RNG, reseeded from (seed, step, rank) every step;
- TREAD's token permutations (the `[routing]` section) come from a generator seeded from (seed, step),
  drawn for the whole global batch like the noise.
So a resumed run continues bit-identically, and N processes with batch B compute the same
examples as one process with batch N·B. No RNG state needs saving.

The global batch of one optimiser step has G = world_size · grad_accum groups of `batch_size`
examples; example i of group g (g = rank · grad_accum + micro-step) sits at global position
k = g + i·G. Position k gets stratum k of the stratified σ draw (spec §4.3).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tdiff import checkpoint as ckpt
from tdiff.acceleration import Routing, route_order, routes_from_config
from tdiff.augment import karras_augment
from tdiff.config import Config, to_toml
from tdiff.data import ImageData, check_compatible, open_dataset
from tdiff.diffusion import Denoiser, sample_sigmas, stratified_uniform
from tdiff.ema import ema_decay, ema_update_
from tdiff.errors import RunError, UserError
from tdiff.model import ImageTransformer, param_groups
from tdiff.sample import SamplingPlan, image_grid, sample_batch, save_png, spread_labels, to_uint8


@dataclass(frozen=True)
class RunOptions:
    """Run-time choices that are not part of the model's configuration."""

    data: str  # cifar10 | artbench10 | a folder | an .npz
    out: Path  # the run directory
    data_dir: Path = Path("data")  # where named datasets are downloaded / looked for
    seed: int = 0
    resume: bool = False  # continue from out's latest checkpoint
    mixed_precision: str = "no"  # no | fp16 | bf16
    cpu: bool = False  # force the CPU even when a GPU is present
    compile: bool = False  # torch.compile the network
    num_workers: int = 2  # DataLoader worker processes
    demo_n: int = 64  # images in each demo grid
    inception: Path | None = None  # Inception weights for train.eval_every (None: $TDIFF_INCEPTION, clean-fid's cache)


@dataclass(frozen=True)
class TrainSummary:
    run_dir: Path
    step: int
    loss: float
    ema_loss: float
    images_per_second: float
    elapsed_seconds: float
    checkpoint: Path | None
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" when interrupted
    process_index: int = 0  # under `accelerate launch` every process returns one; rank 0's reports


# --------------------------------------------------------------------------------------------
# Pure pieces: seeds, LR, data positions


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers, stable across runs and platforms."""
    return int(np.random.SeedSequence([v & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def lr_multiplier(step: int, warmup_steps: int) -> float:
    """Constant LR after a linear warm-up over `warmup_steps` optimiser steps."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


@lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng(mix_seed(seed, epoch, 1)).permutation(n)


class TrainingStream(Dataset):
    """An endless shuffled, augmented stream addressed by position.

    Position p is item perm_e[p mod N] of epoch e = p // N; its augmentation generator is seeded
    from (seed, p), so an item is the same whichever worker or process loads it.
    Items: (augmented (C, H, W), aug_cond (9,), label).
    """

    def __init__(self, dataset: Dataset, seed: int, augment_prob: float):
        self.dataset, self.seed, self.augment_prob = dataset, seed, augment_prob
        self.n = len(dataset)

    def __getitem__(self, position: int):
        epoch, offset = divmod(position, self.n)
        image, label = self.dataset[int(epoch_permutation(self.seed, epoch, self.n)[offset])]
        generator = torch.Generator().manual_seed(mix_seed(self.seed, position, 2))
        augmented, aug_cond = karras_augment(image, self.augment_prob, generator,
                                             enabled=self.augment_prob > 0)
        return augmented, aug_cond, label


def group_positions(step: int, group: int, batch_size: int, n_groups: int) -> list[int]:
    """Stream positions of one micro-batch: global positions g + i·G of this step's global batch."""
    base = step * batch_size * n_groups
    return [base + group + i * n_groups for i in range(batch_size)]


class StepBatches:
    """Batch sampler: for each step from `start`, this process's micro-batches in order."""

    def __init__(self, start: int, end: int, batch_size: int, rank: int, world: int, accum: int):
        self.start, self.end = start, end
        self.batch_size, self.rank, self.world, self.accum = batch_size, rank, world, accum

    def __iter__(self):
        for step in range(self.start, self.end):
            for micro in range(self.accum):
                group = self.rank * self.accum + micro
                yield group_positions(step, group, self.batch_size, self.world * self.accum)

    def __len__(self) -> int:
        return (self.end - self.start) * self.accum


@dataclass(frozen=True)
class StepNoise:
    """The random draws of one optimiser step for the whole global batch (positions k)."""

    u: torch.Tensor  # (B·G,) stratified in [0, 1)
    noise: torch.Tensor  # (B·G, C, H, W)
    keep_label: torch.Tensor  # (B·G,) uniform draws for label dropout

    def group(self, group: int, n_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.arange(group, self.u.shape[0], n_groups)  # k = g + i·G
        return self.u[index], self.noise[index], self.keep_label[index]


def step_noise(seed: int, step: int, global_batch: int, shape: tuple[int, ...]) -> StepNoise:
    generator = torch.Generator().manual_seed(mix_seed(seed, step, 3))
    u = stratified_uniform(global_batch, 0, 1, generator=generator)
    noise = torch.randn((global_batch, *shape), generator=generator)
    return StepNoise(u, noise, torch.rand(global_batch, generator=generator))


def step_token_order(config: Config, seed: int, step: int, global_batch: int) -> torch.Tensor | None:
    """(B·G, n_routes, L) TREAD token permutations of one step, row k for global position k; None
    without routes. From their own (seed, step) generator, so a resumed run routes the same tokens."""
    n_routes, tokens = len(config.routing.rates), (config.model.image_size // config.model.patch_size) ** 2
    if not n_routes:
        return None
    return route_order(global_batch, n_routes, tokens, torch.Generator().manual_seed(mix_seed(seed, step, 5)))


# --------------------------------------------------------------------------------------------
# The objective as a module, so DDP's forward hooks see the loss computation


class TrainingObjective(nn.Module):
    def __init__(self, denoiser: Denoiser, config: Config):
        super().__init__()
        self.denoiser = denoiser
        d = config.diffusion
        self.weighting = d.loss_weighting
        self.sigma_args = dict(image_d=config.model.image_size, sigma_data=d.sigma_data,
                               sigma_min=d.sigma_min, sigma_max=d.sigma_max, p_mean=d.p_mean, p_std=d.p_std)
        self.density = d.sigma_density
        self.routes = routes_from_config(config.routing)  # TREAD; the network ignores them in eval()

    def forward(self, x0, noise, u, aug_cond, class_cond, token_order=None) -> torch.Tensor:
        sigma = sample_sigmas(self.density, u, **self.sigma_args)
        routing = {"routing": Routing(self.routes, token_order)} if token_order is not None else {}
        return self.denoiser.loss(x0, noise, sigma, self.weighting, aug_cond=aug_cond, class_cond=class_cond,
                                  **routing)


# --------------------------------------------------------------------------------------------
# Run directory helpers


def prepare_run_dir(config: Config, options: RunOptions) -> tuple[Config, ckpt.TrainingState | None]:
    """Create or reopen the run directory; on resume, load the latest checkpoint."""
    out = options.out
    if options.resume:
        step_dir = ckpt.latest_step_dir(out)
        if step_dir is None:
            raise UserError(f"--resume: {out} holds no finished checkpoint to resume from")
        state = ckpt.load_checkpoint(step_dir)
        saved = state.model.config
        for section in ("model", "sharing", "diffusion"):
            if getattr(saved, section) != getattr(config, section):
                raise UserError(f"--resume: the [{section}] settings differ from the run's "
                                f"checkpoint in {step_dir}; resume without --preset/--set for that section")
        # Changed [train]/[sample] settings (e.g. more steps) become the run's configuration.
        _write_or_fail(out / "config.toml", to_toml(config))
        return config, state
    if ckpt.latest_step_dir(out) is not None:
        raise UserError(f"{out} already holds a run; add --resume to continue it or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the run directory {out} ({e.strerror or e}); choose another --out") from None
    _write_or_fail(out / "config.toml", to_toml(config))
    return config, None


def _write_or_fail(path: Path, text: str) -> None:
    try:
        ckpt.atomic_write_text(path, text)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); choose another --out") from None


def append_metrics(run_dir: Path, record: dict) -> None:
    try:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise RunError(f"cannot append to {run_dir / 'metrics.jsonl'} ({e.strerror or e}); "
                       "the last checkpoint is intact, resume with --resume once there is room") from None


class StopSignal:
    """Catches SIGINT/SIGTERM so the current step can finish and a checkpoint be written."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
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


def build_optimizer(net: ImageTransformer, config: Config) -> torch.optim.AdamW:
    t = config.train
    groups = param_groups(net, t.lr, t.weight_decay, t.mapping_lr_scale)
    for group in groups:
        group["base_lr"] = group["lr"]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps)


def train(config: Config, options: RunOptions, on_event: Callable[[str, dict], None] | None = None) -> TrainSummary:
    """Train (or resume) a run; returns when train.steps is reached or a stop signal arrives."""
    from accelerate import Accelerator  # heavy; imported where used

    emit = on_event or (lambda kind, info: None)
    t = config.train
    accelerator = Accelerator(mixed_precision=options.mixed_precision, cpu=options.cpu)
    # TF32 matmuls on Ampere+ GPUs, as the reference trains (spec §4.6); no effect on the CPU.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rank, world = accelerator.process_index, accelerator.num_processes
    if not accelerator.is_main_process:  # one process reports; the others would repeat its lines
        emit = lambda kind, info: None  # noqa: E731
    n_groups = world * t.grad_accum

    # Data first: a missing dataset should fail before any model is built.
    data = open_training_data(config, options)
    # In-training FID/KID: Inception and the reference now, so missing weights fail before any step.
    evaluator = prepare_evaluation(config, options, data, accelerator.device) if accelerator.is_main_process else None
    config, state = prepare_run_dir(config, options) if accelerator.is_main_process else (config, None)
    accelerator.wait_for_everyone()
    if state is None and options.resume:
        state = ckpt.load_checkpoint(ckpt.latest_step_dir(options.out))

    # Model, EMA copy, optimiser; restored from the checkpoint when resuming.
    torch.manual_seed(options.seed)  # the initial weights depend on the seed only
    net = ImageTransformer(config.model, config.sharing)
    ema_net = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = build_optimizer(net, config)
    start_step, elapsed_before = 0, 0.0
    if state is not None:
        ckpt.load_into(net, state.model)
        ckpt.load_into(ema_net, state.ema)
        # Moments from the checkpoint, hyper-parameters (lr, betas, ...) from this run's config:
        # load_state_dict would otherwise bring back the saved ones and ignore `--set train.lr=...`.
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(state.optimizer)
        for group, fresh in zip(optimizer.param_groups, settings):
            group.update(fresh)
        start_step, elapsed_before = state.step, float(state.extra.get("elapsed_seconds", 0.0))
    if options.compile:
        net.compile()
    objective = TrainingObjective(Denoiser(net, config.diffusion.sigma_data), config)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    ema_net.to(accelerator.device)
    ema_denoiser = Denoiser(ema_net, config.diffusion.sigma_data)

    stream = TrainingStream(data.dataset, options.seed, config.diffusion.augment_prob)
    batches = StepBatches(start_step, t.steps, t.batch_size, rank, world, t.grad_accum)
    loader = DataLoader(stream, batch_sampler=batches, num_workers=options.num_workers,
                        pin_memory=accelerator.device.type == "cuda", worker_init_fn=_ignore_sigint)
    shape = (config.model.channels, config.model.image_size, config.model.image_size)
    null_class = config.model.num_classes

    emit("start", {"step": start_step, "steps": t.steps, "world_size": world, "device": str(accelerator.device),
                   "global_batch": t.batch_size * n_groups, "run_dir": str(options.out),
                   "params": sum(p.numel() for p in net.parameters())})
    ema_loss = float(state.extra.get("ema_loss", math.nan)) if state else math.nan
    global_loss, last_checkpoint, stopped_by, done = math.nan, None, None, start_step
    started, window_start, window_images = time.monotonic(), time.monotonic(), 0
    batch_iter = iter(loader)
    with StopSignal() as stop:
        for step in range(start_step, t.steps):
            # --- one optimiser step: grad_accum micro-batches, gradients synced on the last
            torch.manual_seed(mix_seed(options.seed, step, rank, 4))  # network dropout
            draws = step_noise(options.seed, step, t.batch_size * n_groups, shape)
            orders = step_token_order(config, options.seed, step, t.batch_size * n_groups)  # TREAD routes
            objective.train()
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(t.grad_accum):
                images, aug_cond, labels = next(batch_iter)
                u, noise, keep = draws.group(rank * t.grad_accum + micro, n_groups)
                if null_class:
                    labels = labels.masked_fill(keep < config.diffusion.cond_dropout, null_class)
                device = accelerator.device
                order = orders[rank * t.grad_accum + micro::n_groups].to(device) if orders is not None else None
                with accelerator.autocast():
                    losses = objective(images.to(device), noise.to(device), u.to(device),
                                       aug_cond.to(device), labels.to(device) if null_class else None,
                                       token_order=order)
                loss = losses.mean() / t.grad_accum
                sync = micro == t.grad_accum - 1
                with accelerator.no_sync(objective) if not sync else contextlib.nullcontext():
                    accelerator.backward(loss)
                step_loss += loss.detach()
            # --- the step's loss over all processes; stop before touching the weights if non-finite
            global_loss = accelerator.reduce(step_loss, reduction="mean").item()
            if not math.isfinite(global_loss):
                where = last_checkpoint or ckpt.latest_step_dir(options.out)
                raise RunError(f"non-finite loss ({global_loss}) at step {step + 1}; weights not updated. "
                               f"Last good checkpoint: {where or 'none yet'}")
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_multiplier(step, t.warmup_steps)
            if t.grad_clip > 0:
                accelerator.clip_grad_norm_(objective.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # --- EMA of the weights (decay 0 at the first update copies them) and of the loss
            decay = ema_decay(step, t.ema_inv_gamma, t.ema_power, 0.0, t.ema_max)
            ema_update_(ema_net, accelerator.unwrap_model(objective).denoiser.inner, decay)
            ema_loss = global_loss if math.isnan(ema_loss) else decay * ema_loss + (1 - decay) * global_loss
            window_images += t.batch_size * n_groups
            done = step + 1
            now = time.monotonic()
            elapsed = elapsed_before + now - started
            emit("step", {"step": done, "loss": global_loss, "ema_loss": ema_loss})

            # --- periodic work: metrics, demo grid, checkpoint, stop request
            if done % t.log_every == 0 or done == t.steps:
                rate = window_images / max(now - window_start, 1e-9)
                record = {"step": done, "loss": global_loss, "ema_loss": ema_loss,
                          "lr": optimizer.param_groups[0]["lr"], "images_per_second": rate,
                          "elapsed_seconds": elapsed}
                if accelerator.is_main_process:
                    append_metrics(options.out, record)
                emit("log", record)
                window_start, window_images = now, 0
            if t.demo_every and done % t.demo_every == 0 and accelerator.is_main_process:
                path = write_demo_grid(ema_denoiser, config, options, done, accelerator.device)
                emit("demo", {"step": done, "path": str(path)})
            if evaluator is not None and done % t.eval_every == 0:
                record = evaluator(ema_denoiser, done)
                append_metrics(options.out, record)
                emit("eval", record)
            stop_now = _any_process(accelerator, stop.received is not None)
            if done % t.save_every == 0 or done == t.steps or stop_now:
                last_checkpoint = save(accelerator, options, config, objective, ema_net, optimizer, done,
                                       {"elapsed_seconds": elapsed, "ema_loss": ema_loss, "seed": options.seed})
                emit("checkpoint", {"step": done, "path": str(last_checkpoint)})
            if stop_now:
                stopped_by = stop.received or "a signal on another process"
                break
    seconds = time.monotonic() - started
    rate = (done - start_step) * t.batch_size * n_groups / max(seconds, 1e-9)
    summary = TrainSummary(options.out, done, global_loss, ema_loss, rate, elapsed_before + seconds,
                           last_checkpoint, stopped_by, rank)
    emit("end", summary.__dict__)
    return summary


def _ignore_sigint(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group; only the main process should act on it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _any_process(accelerator, flag: bool) -> bool:
    """True on every process if any process received a stop signal (keeps collectives aligned)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def save(accelerator, options: RunOptions, config: Config, objective, ema_net, optimizer, step: int,
         extra: dict) -> Path | None:
    from accelerate.utils import gather_object

    net = _plain(accelerator.unwrap_model(objective).denoiser.inner)
    # DDP keeps every process's weights equal and rank 0 saves them for all: check that bit for bit,
    # and keep each process's digest in the checkpoint (extra["weights_sha256"], by rank).
    digests = gather_object([weights_digest(net.state_dict(), ema_net.state_dict())])
    if len(set(digests)) > 1:
        where = ckpt.latest_step_dir(options.out)
        raise RunError(f"the {len(digests)} processes hold different weights at step {step} "
                       f"({', '.join(d[:12] for d in digests)}); not saved. Last good checkpoint: "
                       f"{where or 'none yet'}")
    extra = {**extra, "weights_sha256": digests}
    accelerator.wait_for_everyone()
    path = None
    if accelerator.is_main_process:
        path = ckpt.save_checkpoint(options.out, step, config, net, ema_net, optimizer, extra,
                                    keep_last=config.train.keep_last)
    accelerator.wait_for_everyone()
    return path


def weights_digest(*state_dicts: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensor names and raw bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for state in state_dicts:
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _plain(net: nn.Module) -> nn.Module:
    """The module whose state_dict has clean keys (torch.compile wraps the forward, not the keys)."""
    return getattr(net, "_orig_mod", net)


@torch.no_grad()
def write_demo_grid(denoiser: Denoiser, config: Config, options: RunOptions, step: int, device) -> Path:
    """A grid of EMA samples from fixed seeds 0..n-1 and evenly spread labels."""
    n = options.demo_n
    m = config.model
    labels = spread_labels(n, m.num_classes) if m.num_classes else None
    images = sample_batch(denoiser, SamplingPlan.from_config(config), list(range(n)), labels,
                          (m.channels, m.image_size, m.image_size), m.num_classes, device)
    path = options.out / "samples" / f"demo-{ckpt.step_name(step)}.png"
    path.parent.mkdir(exist_ok=True)
    save_png(image_grid(to_uint8(images)), path)
    return path


def prepare_evaluation(config: Config, options: RunOptions, data: ImageData, device) -> Callable | None:
    """(EMA denoiser, step) -> a metrics.jsonl eval record, when train.eval_every > 0; else None.

    The paper's protocol (k-diffusion's in-training evaluation): train.eval_n samples by DPM++(2M) SDE,
    eta 0, heun, 50 Karras steps, no guidance, uniform random labels, fixed seeds (the same noise at every
    evaluation), against train.eval_n un-augmented training images with k-diffusion's resize. The
    Inception weights and the reference features are loaded here, at the start of the run (the reference
    is cached beside the data, shared with `tdiff eval --protocol paper`).
    """
    if not config.train.eval_every:
        return None
    from tdiff import evaluate  # heavy and only needed here

    protocol = evaluate.PROTOCOLS["paper"]
    n = config.train.eval_n
    extractor = evaluate.load_inception(options.inception, device=device, resize=protocol.resize)
    reference = evaluate.training_reference(data, options.data_dir, extractor, protocol, n)
    plan = evaluate.protocol_plan(protocol, config)

    def run(denoiser: Denoiser, step: int) -> dict:
        result = evaluate.evaluate_checkpoint(denoiser, config, reference, extractor, plan=plan, n=n, seed=0,
                                              batch_size=max(config.train.batch_size, 200), device=device)
        return evaluate.eval_record(step, result, protocol.name)

    return run
