"""One optimiser step of `tdiff train`: the code `train`, the benchmarks and `compare --measure` all run.

`Trainer` holds one process's network, EMA copy, AdamW and objective, and `Trainer.step` performs
one optimiser step on the micro-batches it is given. The step never waits for the host: the loss,
its EMA and a "first non-finite step" marker stay on the device, and `Trainer.read` fetches them
(one small collective and one device-to-host copy) when the caller wants to log, save or stop.

Every random draw of a step is a pure function of (seed, step): σ, noise and label dropout are drawn
for the whole global batch on the device from a generator seeded with (seed, step), and each process
takes its own examples; TREAD's token permutations likewise. The global batch of one optimiser step
has G = world_size · grad_accum groups of `batch_size` examples; example i of group g
(g = rank · grad_accum + micro-step) sits at global position k = g + i·G and gets stratum k of the
stratified σ draw (spec §4.3). So a resumed run continues bit-identically and N processes with
batch B compute the same examples as one process with batch N·B.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from tdiff import hardware
from tdiff.acceleration import Routing, route_order, routes_from_config
from tdiff.checkpoint import TrainingState, load_into
from tdiff.config import Config
from tdiff.diffusion import Denoiser, drop_labels, sample_sigmas, stratified_uniform
from tdiff.ema import ema_decay, ema_update_
from tdiff.model import ImageTransformer, check_fits, param_groups
from tdiff.seeds import mix_seed

MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images (B, C, H, W), aug_cond (B, 9), labels (B,)
TRAINING_BYTES_PER_WEIGHT = 20  # float32 weights, gradients, EMA copy and AdamW's two moments


def lr_multiplier(step: int, warmup_steps: int) -> float:
    """Constant LR after a linear warm-up over `warmup_steps` optimiser steps."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


@dataclass(frozen=True)
class StepNoise:
    """The random draws of one optimiser step for the whole global batch (positions k)."""

    u: torch.Tensor  # (B·G,) stratified in [0, 1)
    noise: torch.Tensor  # (B·G, C, H, W)
    keep_label: torch.Tensor  # (B·G,) uniform draws for label dropout

    def group(self, group: int, n_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.u[group::n_groups], self.noise[group::n_groups], self.keep_label[group::n_groups]  # k = g + i·G


def _generator(seed: int, step: int, purpose: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(mix_seed(seed, step, purpose))


def step_noise(seed: int, step: int, global_batch: int, shape: tuple[int, ...], device="cpu") -> StepNoise:
    """σ strata, noise and label-dropout draws of one step, drawn on `device` (the same numbers on every
    device of one kind; a CPU run and a CUDA run of the same seed draw different ones)."""
    generator = _generator(seed, step, 3, device)
    u = stratified_uniform(global_batch, 0, 1, generator=generator, device=device)
    noise = torch.randn((global_batch, *shape), generator=generator, device=device)
    return StepNoise(u, noise, torch.rand(global_batch, generator=generator, device=device))


def step_token_order(config: Config, seed: int, step: int, global_batch: int, device="cpu") -> torch.Tensor | None:
    """(B·G, n_routes, L) TREAD token permutations of one step, row k for global position k; None
    without routes."""
    n_routes, tokens = len(config.routing.rates), (config.model.image_size // config.model.patch_size) ** 2
    if not n_routes:
        return None
    return route_order(global_batch, n_routes, tokens, _generator(seed, step, 5, device), device)


class TrainingObjective(nn.Module):
    """The per-example loss as a module, so DDP's forward hooks see the loss computation."""

    def __init__(self, denoiser: Denoiser, config: Config):
        super().__init__()
        self.denoiser = denoiser
        d = config.diffusion
        self.weighting = d.loss_weighting
        self.sigma_args = dict(
            image_d=config.model.image_size,
            sigma_data=d.sigma_data,
            sigma_min=d.sigma_min,
            sigma_max=d.sigma_max,
            p_mean=d.p_mean,
            p_std=d.p_std,
        )
        self.density = d.sigma_density
        self.routes = routes_from_config(config.routing)  # TREAD; the network ignores them in eval()

    def forward(self, x0, noise, u, aug_cond, class_cond, token_order=None) -> torch.Tensor:
        sigma = sample_sigmas(self.density, u, **self.sigma_args)
        routing = {"routing": Routing(self.routes, token_order)} if token_order is not None else {}
        return self.denoiser.loss(x0, noise, sigma, self.weighting, aug_cond=aug_cond, class_cond=class_cond, **routing)


def build_optimizer(net: ImageTransformer, config: Config) -> torch.optim.AdamW:
    """AdamW over the four parameter groups, with torch's fused kernel where the device has one (CUDA, and
    the CPU since torch 2.4: one vectorised, multi-threaded pass, 3x faster than foreach there for D16's
    64.7M parameters), else the foreach (multi-tensor) implementation."""
    t = config.train
    groups = param_groups(net, t.lr, t.weight_decay, t.mapping_lr_scale)
    for group in groups:
        group["base_lr"] = group["lr"]
    settings = dict(lr=t.lr, betas=t.betas, eps=t.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **settings)
    except RuntimeError:  # no fused kernel for this device or torch version
        return torch.optim.AdamW(groups, foreach=True, **settings)


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Moments from a checkpoint, hyper-parameters (lr, betas, ...) from this run's configuration:
    load_state_dict alone would bring back the saved ones and ignore `--set train.lr=...`."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, fresh in zip(optimizer.param_groups, settings):
        group.update(fresh)


@dataclass(frozen=True)
class StepReport:
    """What `Trainer.read` fetched from the device, all processes combined."""

    loss: float  # the latest step's loss, mean over processes
    ema_loss: float  # EMA of the loss with the weights' EMA decay
    first_bad_step: int | None  # the first step (1-based) with a non-finite loss or gradient norm
    stop_requested: bool  # a stop signal reached some process


class Trainer:
    """One process's network, EMA copy, optimiser and objective, and the optimiser step on them."""

    def __init__(
        self, config: Config, accelerator, seed: int, state: TrainingState | None = None, compile_blocks: bool = False
    ):
        self.config, self.accelerator, self.seed = config, accelerator, seed
        self.device = accelerator.device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.accum = config.train.grad_accum
        self.n_groups = self.world * self.accum
        self.global_batch = config.train.batch_size * self.n_groups
        m = config.model
        check_fits(
            m,
            config.sharing,
            self.device,
            TRAINING_BYTES_PER_WEIGHT,
            "to train: weights, gradients, EMA and AdamW's two moments in float32",
        )
        self.shape = (m.channels, m.image_size, m.image_size)
        hardware.configure_matmul_precision()
        if self.device.type == "cpu":
            hardware.retain_freed_memory()

        torch.manual_seed(seed)  # the initial weights depend on the seed only
        net = ImageTransformer(m, config.sharing)
        self.ema_net = copy.deepcopy(net).eval().requires_grad_(False)
        optimizer = build_optimizer(net, config)
        self.start_step, self.elapsed_before, ema_loss = 0, 0.0, math.nan
        if state is not None:
            load_into(net, state.model)
            load_into(self.ema_net, state.ema)
            restore_optimizer(optimizer, state.optimizer)
            self.start_step = state.step
            self.elapsed_before = float(state.extra.get("elapsed_seconds", 0.0))
            ema_loss = float(state.extra.get("ema_loss", math.nan))
        if compile_blocks:
            net.compile_blocks()
        objective = TrainingObjective(Denoiser(net, config.diffusion.sigma_data), config)
        self.objective, self.optimizer = accelerator.prepare(objective, optimizer)
        self.net = net  # the bare network, whose state_dict checkpoints save; parameters shared with objective
        self.ema_net.to(self.device)
        self.ema_denoiser = Denoiser(self.ema_net, config.diffusion.sigma_data)
        self.params = list(net.parameters())
        # Device-side bookkeeping, read only by `read`: no host sync inside `step`.
        self._loss = torch.zeros((), device=self.device)
        self._ema_loss = torch.full((), ema_loss, device=self.device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)

    def _micro_step(self, micro: int, batch: MicroBatch, draws: StepNoise, orders) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients are all-reduced on the last one only."""
        images, aug_cond, labels = batch
        group = self.rank * self.accum + micro
        u, noise, keep = draws.group(group, self.n_groups)
        null_class = self.config.model.num_classes
        if null_class:
            labels = drop_labels(labels, self.config.diffusion.cond_dropout, null_class, uniform=keep)
        order = orders[group :: self.n_groups] if orders is not None else None
        with self.accelerator.autocast():
            losses = self.objective(images, noise, u, aug_cond, labels if null_class else None, token_order=order)
        loss = losses.mean() / self.accum
        last = micro == self.accum - 1
        with contextlib.nullcontext() if last else self.accelerator.no_sync(self.objective):
            self.accelerator.backward(loss)
        return loss.detach()

    def step(self, step: int, micro_batches: Iterable[MicroBatch]) -> None:
        """Optimiser step `step` (0-based) on this process's `grad_accum` micro-batches, on the device."""
        t = self.config.train
        torch.manual_seed(mix_seed(self.seed, step, self.rank, 4))  # network dropout
        draws = step_noise(self.seed, step, self.global_batch, self.shape, self.device)
        orders = step_token_order(self.config, self.seed, step, self.global_batch, self.device)
        self.objective.train()
        loss = sum(self._micro_step(micro, batch, draws, orders) for micro, batch in enumerate(micro_batches))
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_multiplier(step, t.warmup_steps)
        self.accelerator.unscale_gradients()  # fp16's loss scale; nothing otherwise
        if t.grad_clip > 0:
            # foreach=None: torch's multi-tensor kernels where they pay (CUDA), the plain loop on the CPU
            norm = torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip, foreach=None)
        else:
            norm = torch.zeros((), device=self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        decay = ema_decay(step, t.ema_inv_gamma, t.ema_power, 0.0, t.ema_max)
        ema_update_(self.ema_net, self.net, decay)
        self._record(step, loss, norm, decay)

    def _record(self, step: int, loss: torch.Tensor, norm: torch.Tensor, decay: float) -> None:
        bad = ~(loss.isfinite() & norm.isfinite())
        self._first_bad = torch.where(bad & (self._first_bad < 0), step + 1, self._first_bad)
        blended = decay * self._ema_loss + (1 - decay) * loss
        self._ema_loss = torch.where(self._ema_loss.isnan(), loss, blended)  # the first step: the loss itself
        self._loss = loss

    def read(self, stop_here: bool = False) -> StepReport:
        """Fetch the loss, its EMA and the non-finite marker, combined over processes (a host sync)."""
        row = torch.stack(
            [
                self._loss.float(),
                self._ema_loss.float(),
                self._first_bad.float(),
                torch.tensor(float(stop_here), device=self.device),
            ]
        )
        rows = self.accelerator.gather(row[None]) if self.world > 1 else row[None]  # (world, 4)
        values = rows.tolist()
        bad = [int(r[2]) for r in values if r[2] >= 0]
        n = len(values)
        return StepReport(
            loss=sum(r[0] for r in values) / n,
            ema_loss=sum(r[1] for r in values) / n,
            first_bad_step=min(bad) if bad else None,
            stop_requested=any(r[3] for r in values),
        )


# --------------------------------------------------------------------------------------------
# Measuring the step: `compare --measure` and bench/ time exactly what `tdiff train` runs


def synthetic_micro_batch(config: Config, device: torch.device, seed: int = 1) -> MicroBatch:
    """A micro-batch already on the device: uniform pixels in [-1, 1], no augmentation, random labels."""
    m, batch_size = config.model, config.train.batch_size
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((batch_size, m.channels, m.image_size, m.image_size), generator=generator) * 2 - 1
    labels = torch.randint(0, max(m.num_classes, 1), (batch_size,), generator=generator)
    return images.to(device), torch.zeros(batch_size, 9, device=device), labels.to(device)


def seconds_per_step(trainer: Trainer, batch: MicroBatch, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per optimiser step, seconds of the first warm-up step) on a fixed micro-batch.

    On the CPU the median of individually timed steps (robust to other processes' load); on a GPU
    the mean over `steps` queued back to back, synchronised only at both ends, as the loop runs them.
    The first step includes compilation under --compile and the allocator's first touches.
    """
    micro_batches = [batch] * trainer.accum
    step, first = trainer.start_step, 0.0
    for _ in range(max(warmup, 1)):
        began = time.perf_counter()
        trainer.step(step, micro_batches)
        hardware.synchronize(trainer.device)
        first = first or time.perf_counter() - began
        step += 1
    if trainer.device.type == "cpu":
        times = []
        for _ in range(steps):
            began = time.perf_counter()
            trainer.step(step, micro_batches)
            times.append(time.perf_counter() - began)
            step += 1
        return statistics.median(times), first
    began = time.perf_counter()
    for _ in range(steps):
        trainer.step(step, micro_batches)
        step += 1
    hardware.synchronize(trainer.device)
    return (time.perf_counter() - began) / steps, first
