"""TREAD routing in training and Δ-DiT block caching in sampling, side by side on one device.

    python bench/acceleration.py                      # d2s8i and d16 at the presets' width 512
    python bench/acceleration.py --width 256 --train-batch 8 --sample-batch 4
    python bench/acceleration.py --checkpoint runs/x  # cache PSNR on trained weights

Training: images/s of full optimiser steps (`tdiff.step.Trainer`, exactly what `tdiff train`
runs) with and without each preset's `-tread` route, plus FLOPs counted by FlopCounterMode on the
meta device (forward per image, forward + backward per step), as `tdiff params` counts them.
Sampling: images/s at --sample-steps DPM-Solver++(2M) steps without and with each cache plan, the
fraction of block applications skipped, and the PSNR of cached against uncached samples drawn from
the same noise. Without --checkpoint the weights are random (zero-initialised branches filled with
small noise so every block matters): speed and skipped fractions are real, PSNR only indicative.
Prints markdown tables; docs/acceleration.md quotes them.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from tdiff.acceleration import BlockCache, CachePlan, Routing, routes_from_config
from tdiff.config import Config, apply_overrides, load_preset
from tdiff.diffusion import Denoiser
from tdiff.model import build_model
from tdiff.sample import SamplingPlan, load_denoiser, sample_batch, spread_labels
from tdiff.step import Trainer, seconds_per_step, synthetic_micro_batch


def preset(name: str, width: int | None) -> Config:
    overrides = [f"model.width={width}"] if width else []
    return apply_overrides(load_preset(name), overrides)


def perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill the zero-initialised weights with small noise, so a random model's blocks all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return net


# ------------------------------------------------------------------------------------------------
# Training


def train_flops(config: Config, routed: bool, batch: int) -> tuple[float, float]:
    """(forward GFLOP per image, forward + backward GFLOP per optimiser step of `batch` images)."""
    m = config.model
    net = build_model(m, config.sharing, "meta").train()
    routes = routes_from_config(config.routing) if routed else ()
    tokens = (m.image_size // m.patch_size) ** 2

    def run(n):
        x = torch.zeros(n, m.channels, m.image_size, m.image_size, device="meta")
        kwargs = {"routing": Routing.draw(routes, n, tokens, device="meta")} if routes else {}
        return net(
            x, torch.zeros(n, device="meta"), class_cond=torch.zeros(n, dtype=torch.long, device="meta"), **kwargs
        )

    with FlopCounterMode(display=False) as forward:
        run(1)
    with FlopCounterMode(display=False) as step:
        run(batch).sum().backward()
    return forward.get_total_flops() / 1e9, step.get_total_flops() / 1e9


def train_speed(config: Config, routed: bool, batch: int, steps: int, warmup: int = 1) -> float:
    """Images per second of `tdiff train`'s optimiser step (tdiff.step.Trainer) on a fixed batch on the
    CPU: the median of `steps` timed steps after `warmup` untimed ones (on a shared CPU another process
    can stall any single step)."""
    from accelerate import Accelerator

    if not routed:
        config = apply_overrides(config, ["routing.rates=[]", "routing.starts=[]", "routing.ends=[]"])
    config = apply_overrides(config, [f"train.batch_size={batch}", "train.grad_accum=1"])
    trainer = Trainer(config, Accelerator(cpu=True), seed=0)
    seconds, _ = seconds_per_step(trainer, synthetic_micro_batch(config, trainer.device), steps, warmup)
    return batch / seconds


# ------------------------------------------------------------------------------------------------
# Sampling


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a - b).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)


def sample_speed(denoiser, config: Config, batch: int, steps: int, cache_plan: CachePlan | None, repeats: int = 2):
    """(images/s, samples, skipped fraction) of a batch of `batch` images at `steps` steps; the
    fastest of `repeats` identical runs."""
    m = config.model
    plan = SamplingPlan("dpmpp_2m", steps, config.diffusion.sigma_min, config.diffusion.sigma_max, 7.0, 1.0, {})
    labels = spread_labels(batch, m.num_classes) if m.num_classes else None
    kwargs = {"block_cache": BlockCache(cache_plan)} if cache_plan else {}
    seconds = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        images = sample_batch(
            denoiser,
            plan,
            list(range(batch)),
            labels,
            (m.channels, m.image_size, m.image_size),
            m.num_classes,
            torch.device("cpu"),
            **kwargs,
        )
        seconds = min(seconds, time.perf_counter() - start)
    skipped = kwargs["block_cache"].skipped_fraction if kwargs else 0.0
    return batch / seconds, images, skipped


def parse_plans(text: str, steps: int, applications: int) -> list[CachePlan]:
    """'default' or SPAN:BOUNDARY:INTERVAL items, comma-separated."""
    plans = []
    for item in text.split(","):
        if item == "default":
            plans.append(CachePlan.default(steps, applications))
        else:
            span, boundary, interval = (int(v) for v in item.split(":"))
            plans.append(CachePlan(span, boundary, interval))
    return plans


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="d2s8i,d16", help="plain presets; each has a -tread twin")
    parser.add_argument("--width", type=int, default=None, help="override model.width (default: the preset's)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=5, help="timed optimiser steps per row (median)")
    parser.add_argument("--sample-batch", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="sampling runs per row, interleaved; the fastest counts")
    parser.add_argument(
        "--cache-plans", default="default,8:30:3", help="'default' or SPAN:BOUNDARY:INTERVAL, comma-separated"
    )
    parser.add_argument("--checkpoint", default=None, help="sample from these weights instead (one preset)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.presets.split(",")
    print(f"device cpu, {torch.get_num_threads()} threads, torch {torch.__version__}\n")

    if not args.skip_train:
        print(f"## Training: batch {args.train_batch}, median of {args.train_steps} steps after 1 warm-up\n")
        print("| preset | route | GFLOP/image fwd | GFLOP/step fwd+bwd | images/s | speed-up |")
        print("|---|---|---:|---:|---:|---:|")
        for name in names:
            config = preset(f"{name}-tread", args.width)
            r = config.routing
            base = None
            for routed in (False, True):
                fwd, step = train_flops(config, routed, args.train_batch)
                speed = train_speed(config, routed, args.train_batch, args.train_steps)
                base = base or speed
                route = f"{r.starts[0]}..{r.ends[0]} @ {r.rates[0]}" if routed else "none"
                print(f"| {name} | {route} | {fwd:.3f} | {step:.1f} | {speed:.2f} | {speed / base:.2f}x |")
        print()

    print(
        f"## Sampling: DPM-Solver++(2M), {args.sample_steps} steps, batch {args.sample_batch}, "
        f"fastest of {args.repeats} interleaved runs\n"
    )
    print("| model | cache (span:boundary:interval) | skipped | images/s | speed-up | PSNR vs uncached, dB |")
    print("|---|---|---:|---:|---:|---:|")
    for name in names[:1] if args.checkpoint else names:
        if args.checkpoint:
            loaded = load_denoiser(args.checkpoint)
            denoiser, config, label = loaded.denoiser, loaded.config, str(loaded.path)
        else:
            config = preset(name, args.width)
            torch.manual_seed(0)
            net = perturbed(build_model(config.model, config.sharing)).eval().requires_grad_(False)
            denoiser, label = Denoiser(net, config.diffusion.sigma_data), f"{name} (random)"
        applications = config.sharing.depth * config.sharing.substeps
        plans = [None, *parse_plans(args.cache_plans, args.sample_steps, applications)]
        best = {}  # plan -> (images/s, samples, skipped); rounds interleave the plans so drift hits all
        for _ in range(args.repeats):
            for plan in plans:
                speed, images, skipped = sample_speed(denoiser, config, args.sample_batch, args.sample_steps, plan, 1)
                if plan not in best or speed > best[plan][0]:
                    best[plan] = (speed, images, skipped)
        base_speed, reference, _ = best[None]
        print(f"| {label} | none | 0% | {base_speed:.2f} | 1.00x | - |")
        for plan in plans[1:]:
            speed, images, skipped = best[plan]
            print(
                f"| {label} | {plan.span}:{plan.boundary}:{plan.interval} | {skipped:.1%} | {speed:.2f} | "
                f"{speed / base_speed:.2f}x | {psnr(images, reference):.1f} |"
            )


if __name__ == "__main__":
    main()
