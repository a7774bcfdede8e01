"""Digits judged by a classifier trained on real digits: score a trained run, or compare TREAD with plain.

    python bench/digits_quality.py --run runs/digits          # score a `tdiff train --preset digits --data digits` run
    python bench/digits_quality.py --run runs/digits --precisions no,bf16   # and bf16 sampling against float32
    python bench/digits_quality.py --images samples/x/samples.npz   # score what `tdiff sample` wrote
    python bench/digits_quality.py                  # TREAD vs plain: 5 CPU-minutes of training per model
    python bench/digits_quality.py --minutes 1 --samples 100   # a quick look

Data: `--data digits`, scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes; tdiff.data),
resized to the model's size by the same bicubic resize `tdiff train` uses, and split in half by a
fixed permutation (--seed). `tdiff train --data digits` trains on all 1,797, so "held out" below means
held out from the judge (and, in the TREAD comparison, from the two models).

The judge: an independent classifier (scikit-learn MLP, one hidden layer of 128) trained on the real
first half at the model's size. Accuracy = how often it assigns a sample to the class the sample was
asked for; its accuracy on the real held-out half is the ceiling. FID on that MLP's hidden features
against the real held-out half is "MLP-FID" (not comparable to Inception FID).

--run RUN: the run's newest EMA weights sample --samples class-conditional images with labels
0..9 spread and seeds 0.. and the run's own [sample] settings (--sample-steps, --cfg-scale change them):
the images `tdiff sample RUN -n 500` writes. --precisions no,bf16 samples the same seeds once per
network precision (`tdiff sample --mixed-precision`) and adds each one's PSNR against the first's
images. --images NPZ scores a samples.npz of `tdiff sample` (images and labels) instead.

Without --run or --images, the TREAD comparison: two class-conditional models of the `tiny` width
(64) with D2S8I sharing (2 blocks x 8 interleaved applications, 16x16 at patch 2 -> 64 tokens),
trained on the first half only, start from the same weights and see the same batches and noise step
for step; one trains with the d2s8i-tread route (applications 2..12, rate 0.5). Both train on one
thread, in alternating chunks of steps, until each has spent the same budget of CPU time
(time.process_time): on an idle machine that is the same wall-clock time, and on a shared one the
budget is not eaten by other processes' load (a multi-threaded budget would be: OpenMP spin-waits
count as CPU time when threads are descheduled). Their EMA weights sample with DPM-Solver++(2M);
finally each samples again through the Δ-DiT cache (default plan) from the same noise: accuracy,
MLP-FID, skipped fraction and PSNR against its uncached samples.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.neural_network import MLPClassifier

from tdiff.acceleration import BlockCache, CachePlan
from tdiff.config import apply_overrides, load_preset
from tdiff.data import digits_arrays, fit_array, to_signed
from tdiff.diffusion import Denoiser
from tdiff.errors import UserError
from tdiff.evaluate import feature_statistics, frechet_distance
from tdiff.sample import (
    SamplingPlan,
    choose_labels,
    generate,
    image_grid,
    inference_denoiser,
    load_denoiser,
    make_plan,
    sample_batch,
    save_png,
    spread_labels,
    to_uint8,
)
from tdiff.seeds import mix_seed
from tdiff.step import Trainer

SIZE = 16  # the TREAD comparison's image size
ROUTE = ["routing.rates=[0.5]", "routing.starts=[2]", "routing.ends=[12]"]  # the d2s8i-tread route


# ------------------------------------------------------------------------------------------------
# The judge: an MLP trained on real digits, and FID on its hidden layer


def signed(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1], as `tdiff train` feeds the model."""
    return to_signed(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))


@dataclass
class Judge:
    """The real digits at one size, split in half, and the MLP trained on the first half."""

    size: int
    train_x: torch.Tensor  # (N, 1, size, size) float32 in [-1, 1]
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    mlp: MLPClassifier
    ceiling: float  # the MLP's accuracy on the real held-out half

    @classmethod
    def train(cls, size: int, seed: int = 0) -> Judge:
        images, labels = digits_arrays()  # exactly what --data digits trains on, before resizing
        x, y = signed(fit_array(images, size)), torch.from_numpy(labels)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        train, test = order[: len(x) // 2], order[len(x) // 2 :]
        mlp = MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=seed)
        mlp.fit(x[train].flatten(1).numpy(), y[train].numpy())
        ceiling = float(mlp.score(x[test].flatten(1).numpy(), y[test].numpy()))
        return cls(size, x[train], y[train], x[test], y[test], mlp, ceiling)

    def hidden(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0)

    def __call__(self, images: torch.Tensor, requested: torch.Tensor) -> tuple[float, float]:
        """(accuracy against the requested labels, MLP-FID against the real held-out half)."""
        x = images.flatten(1).numpy()
        accuracy = float((self.mlp.predict(x) == requested.numpy()).mean())
        return accuracy, fid(self.hidden(x), self.hidden(self.test_x.flatten(1).numpy()))

    def per_class(self, images: torch.Tensor, requested: torch.Tensor) -> list[float]:
        hits = self.mlp.predict(images.flatten(1).numpy()) == requested.numpy()
        return [float(hits[requested.numpy() == c].mean()) for c in range(10)]


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of two feature sets, tdiff.evaluate's (robust to dead ReLU units)."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def save_grid(folder: Path | None, name: str, images: torch.Tensor) -> None:
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        file = "".join(c if c.isalnum() or c in "-." else "_" for c in name) + ".png"
        save_png(image_grid(to_uint8(images[:100]), columns=10), folder / file)


# ------------------------------------------------------------------------------------------------
# Scoring a run or a samples.npz


def run_samples(
    run: Path, n: int, steps: int | None, cfg_scale: float | None, precision: str = "no"
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`tdiff sample RUN -n N [--steps S] [--cfg-scale G] [--mixed-precision P]`'s images in memory:
    (images, labels, what they are)."""
    loaded = load_denoiser(run, ema=True)
    m = loaded.config.model
    if (m.channels, m.num_classes) != (1, 10):
        raise UserError(
            f"{run}: a model of {m.channels} channel(s) and {m.num_classes} classes; "
            "the judge needs a class-conditional grey digits model (1 channel, 10 classes)"
        )
    plan = make_plan(loaded.config, steps=steps, cfg_scale=cfg_scale)
    labels = choose_labels("spread", n, m.num_classes)
    images = generate(
        inference_denoiser(loaded.denoiser, precision), loaded.config, plan, n, seed=0, labels=labels, batch_size=100
    )
    guidance = f", cfg {plan.cfg_scale:g}" if plan.cfg_scale != 1 else ""
    network = "float32" if precision == "no" else precision
    what = f"{run} step {loaded.step} EMA, {plan.sampler} {plan.steps} steps{guidance}, {network} network"
    return signed(images), labels, what


def npz_samples(path: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    with np.load(path) as npz:
        if "labels" not in npz.files:
            raise UserError(f"{path} has no labels: sample a class-conditional model")
        images, labels = npz["images"], npz["labels"]
    if images.ndim != 4 or images.shape[3] != 1 or images.shape[1] != images.shape[2]:
        raise UserError(f"{path}: images of shape {images.shape}; the judge needs square grey (N, S, S, 1)")
    return signed(images), torch.from_numpy(labels.astype(np.int64)), str(path)


def score(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    if args.run is not None:
        sets = [
            run_samples(args.run, args.samples, args.sample_steps, args.cfg_scale, precision)
            for precision in args.precisions.split(",")
        ]
    else:
        sets = [npz_samples(args.images)]
    seconds = time.perf_counter() - started
    first = sets[0][0]
    judge = Judge.train(first.shape[-1], args.seed)
    save_grid(args.out, "samples", first)
    real = judge.train_x[: len(first)], judge.train_y[: len(first)]
    real_accuracy, real_fid = judge(*real)
    size = f"{judge.size}x{judge.size}"
    print(
        f"digits {size}: judge trained on {len(judge.train_x)} real digits, {len(judge.test_x)} held out; "
        f"{len(first) * len(sets)} samples in {seconds:.0f}s\n"
    )
    print("| images | n | accuracy | MLP-FID | PSNR vs the first row, dB |")
    print("|---|---:|---:|---:|---:|")
    for images, requested, what in sets:
        accuracy, score = judge(images, requested)
        print(f"| {what} | {len(images)} | **{accuracy:.3f}** | {score:.2f} | {psnr(images, first):.1f} |")
    print(f"| real held-out digits (the judge's ceiling) | {len(judge.test_x)} | {judge.ceiling:.3f} | 0 | |")
    print(f"| real training digits (the judge's own) | {len(real[0])} | {real_accuracy:.3f} | {real_fid:.2f} | |")
    per_class = judge.per_class(first, sets[0][1])
    print("\nper requested class (first row): " + "  ".join(f"{c}: {a:.2f}" for c, a in enumerate(per_class)))


# ------------------------------------------------------------------------------------------------
# The TREAD comparison


def config(routed: bool):
    base = load_preset("tiny")
    overrides = [
        f"model.image_size={SIZE}",
        "model.channels=1",
        "model.patch_size=2",
        "sharing.substeps=8",
        "train.batch_size=32",
        'sample.sampler="dpmpp_2m"',
    ]
    return apply_overrides(base, overrides + (ROUTE if routed else []))


class Run:
    """One model's training state: `tdiff train`'s own optimiser step (tdiff.step.Trainer), stepwise."""

    def __init__(self, routed: bool, seed: int):
        from accelerate import Accelerator

        self.config = config(routed)
        self.trainer = Trainer(self.config, Accelerator(cpu=True), seed)  # same seed: identical initial weights
        self.ema = self.trainer.ema_net
        self.step, self.seconds, self.wall, self.seed, self.loss = 0, 0.0, 0.0, seed, math.nan

    def train(self, images, labels, n_steps: int) -> None:
        t = self.config.train
        start, wall = time.process_time(), time.perf_counter()
        for _ in range(n_steps):
            batch = torch.randint(
                0,
                len(images),
                (t.batch_size,),
                generator=torch.Generator().manual_seed(mix_seed(self.seed, self.step, 9)),
            )
            self.trainer.step(self.step, [(images[batch], torch.zeros(t.batch_size, 9), labels[batch])])
            self.step += 1
        self.loss = self.trainer.read().ema_loss
        self.seconds += time.process_time() - start  # CPU time of this process: the budget
        self.wall += time.perf_counter() - wall

    def sample(self, n: int, steps: int, cache: BlockCache | None = None, batch: int = 100) -> torch.Tensor:
        m = self.config.model
        plan = SamplingPlan(
            "dpmpp_2m", steps, self.config.diffusion.sigma_min, self.config.diffusion.sigma_max, 7.0, 1.0, {}
        )
        denoiser = Denoiser(self.ema, self.config.diffusion.sigma_data)
        kwargs = {"block_cache": cache} if cache is not None else {}
        out = []
        for start in range(0, n, batch):
            seeds = list(range(start, min(n, start + batch)))
            out.append(
                sample_batch(
                    denoiser,
                    plan,
                    seeds,
                    spread_labels(len(seeds), m.num_classes, start),
                    (m.channels, m.image_size, m.image_size),
                    m.num_classes,
                    torch.device("cpu"),
                    **kwargs,
                )
            )
        return torch.cat(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)


def compare(args: argparse.Namespace) -> None:
    judge = Judge.train(SIZE, args.seed)
    train_x, train_y = judge.train_x, judge.train_y
    print(
        f"digits {SIZE}x{SIZE}: {len(train_x)} train / {len(judge.test_x)} test; MLP judge accuracy on real "
        f"test images {judge.ceiling:.3f}; {torch.get_num_threads()} threads\n"
    )

    runs = {"plain": Run(False, args.seed), "TREAD 2..12 @ 0.5": Run(True, args.seed)}
    budget = args.minutes * 60
    torch.set_num_threads(1)
    while any(run.seconds < budget for run in runs.values()):
        for run in runs.values():  # alternate, so load on a shared machine falls on both
            if run.seconds < budget:
                run.train(train_x, train_y, args.chunk)
    torch.set_num_threads(args.sample_threads)

    steps = args.sample_steps or 25
    requested = spread_labels(args.samples, 10)
    real_acc, real_fid = judge(train_x[: args.samples], train_y[: args.samples])
    print(f"real training images as 'samples': accuracy {real_acc:.3f}, MLP-FID {real_fid:.2f}\n")
    print(
        f"| model | steps in {args.minutes:g} CPU-min | images per CPU-s | CPU s / wall s | EMA loss | accuracy "
        "| MLP-FID |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    samples = {}
    for name, run in runs.items():
        samples[name] = run.sample(args.samples, steps)
        save_grid(args.out, name, samples[name])
        accuracy, score = judge(samples[name], requested)
        rate = run.step * run.config.train.batch_size / run.seconds
        print(
            f"| {name} | {run.step} | {rate:.1f} | {run.seconds:.0f} / {run.wall:.0f} | {run.loss:.4f} "
            f"| {accuracy:.3f} | {score:.2f} |"
        )

    print(f"\nΔ-DiT cache, {steps} DPM-Solver++(2M) steps, same noise as above\n")
    print("| model | cache (span:boundary:interval) | skipped | accuracy | MLP-FID | PSNR vs uncached, dB |")
    print("|---|---|---:|---:|---:|---:|")
    for name, run in runs.items():
        applications = run.config.sharing.depth * run.config.sharing.substeps
        default = CachePlan.default(steps, applications)
        for plan in (default, CachePlan(applications // 2, default.boundary, 3)):
            cache = BlockCache(plan)
            cached = run.sample(args.samples, steps, cache)
            save_grid(args.out, f"{name} cache {plan.span}-{plan.boundary}-{plan.interval}", cached)
            accuracy, score = judge(cached, requested)
            print(
                f"| {name} | {plan.span}:{plan.boundary}:{plan.interval} | {cache.skipped_fraction:.1%} | "
                f"{accuracy:.3f} | {score:.2f} | {psnr(cached, samples[name]):.1f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--run",
        type=Path,
        default=None,
        help="score this run's (or checkpoint's) EMA samples instead of training two models",
    )
    source.add_argument("--images", type=Path, default=None, help="score a samples.npz of `tdiff sample`")
    parser.add_argument(
        "--minutes", type=float, default=5.0, help="training budget per model, CPU minutes on one thread"
    )
    parser.add_argument("--sample-threads", type=int, default=2, help="threads for sampling (not timed)")
    parser.add_argument("--chunk", type=int, default=20, help="steps per turn when alternating")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument(
        "--sample-steps",
        type=int,
        default=None,
        help="sampler steps [default: the run's sample.steps; 25 in the comparison]",
    )
    parser.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help="--run: classifier-free guidance scale [default: the run's sample.cfg_scale]",
    )
    parser.add_argument(
        "--precisions",
        default="no",
        help="--run: comma list of network precisions (no, bf16, fp16) to sample the same seeds with",
    )
    parser.add_argument("--seed", type=int, default=0, help="the judge's split and weights (and the comparison's)")
    parser.add_argument("--out", type=Path, default=None, help="write a grid of the first 100 samples per row here")
    args = parser.parse_args()
    try:
        if args.run is not None or args.images is not None:
            score(args)
        else:
            compare(args)
    except UserError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
