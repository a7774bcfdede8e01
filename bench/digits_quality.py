"""Does TREAD routing buy sample quality per unit of training time? A CPU check on real digits.

    python bench/digits_quality.py                  # 5 CPU-minutes of training per model
    python bench/digits_quality.py --minutes 1 --samples 100   # a quick look

Data: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), upscaled to 16x16 grey and
split in half by a fixed permutation. Two class-conditional models of the same `tiny` width (64)
with D2S8I sharing (2 blocks x 8 interleaved applications, patch 2 -> 64 tokens) start from the same
weights and see the same batches and noise step for step; one trains with the d2s8i-tread route
(applications 2..12, rate 0.5). Both train on one thread, in alternating chunks of steps, until each
has spent the same budget of CPU time (time.process_time): on an idle machine that is the same
wall-clock time, and on a shared one the budget is not eaten by other processes' load (a
multi-threaded budget would be: OpenMP spin-waits count as CPU time when threads are descheduled).

Quality: EMA weights sample --samples class-conditional images (labels 0..9 spread) with
DPM-Solver++(2M). An independent classifier (scikit-learn MLP, one hidden layer of 128, trained on
the real training half at 16x16) labels them: accuracy = how often it agrees with the requested
class (its accuracy on the real test half is the ceiling). FID is computed on that MLP's hidden
features against the real test half ("MLP-FID"; not comparable to Inception FID). Finally each
model samples again through the Δ-DiT cache (default plan) from the same noise: accuracy, MLP-FID,
skipped fraction and PSNR against its uncached samples.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier

from tdiff.acceleration import BlockCache, CachePlan
from tdiff.config import apply_overrides, load_preset
from tdiff.diffusion import Denoiser
from tdiff.evaluate import feature_statistics, frechet_distance
from tdiff.sample import SamplingPlan, image_grid, sample_batch, save_png, spread_labels, to_uint8
from tdiff.seeds import mix_seed
from tdiff.step import Trainer

SIZE = 16
ROUTE = ["routing.rates=[0.5]", "routing.starts=[2]", "routing.ends=[12]"]  # the d2s8i-tread route


def digits(seed: int = 0):
    """(train images, train labels, test images, test labels): (N, 1, 16, 16) float32 in [-1, 1]."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16 * 2 - 1  # 0..16 -> [-1, 1]
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(-1, 1)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    half = len(images) // 2
    return images[order[:half]], labels[order[:half]], images[order[half:]], labels[order[half:]]


def config(routed: bool):
    base = load_preset("tiny")
    overrides = [f"model.image_size={SIZE}", "model.channels=1", "model.patch_size=2", "sharing.substeps=8",
                 "train.batch_size=32", "sample.sampler=\"dpmpp_2m\""]
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
            batch = torch.randint(0, len(images), (t.batch_size,),
                                  generator=torch.Generator().manual_seed(mix_seed(self.seed, self.step, 9)))
            self.trainer.step(self.step, [(images[batch], torch.zeros(t.batch_size, 9), labels[batch])])
            self.step += 1
        self.loss = self.trainer.read().ema_loss
        self.seconds += time.process_time() - start  # CPU time of this process: the budget
        self.wall += time.perf_counter() - wall

    def sample(self, n: int, steps: int, cache: BlockCache | None = None, batch: int = 100) -> torch.Tensor:
        m = self.config.model
        plan = SamplingPlan("dpmpp_2m", steps, self.config.diffusion.sigma_min, self.config.diffusion.sigma_max,
                            7.0, 1.0, {})
        denoiser = Denoiser(self.ema, self.config.diffusion.sigma_data)
        kwargs = {"block_cache": cache} if cache is not None else {}
        out = []
        for start in range(0, n, batch):
            seeds = list(range(start, min(n, start + batch)))
            out.append(sample_batch(denoiser, plan, seeds, spread_labels(len(seeds), m.num_classes, start),
                                    (m.channels, m.image_size, m.image_size), m.num_classes,
                                    torch.device("cpu"), **kwargs))
        return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# The judge: an MLP trained on real digits, and FID on its hidden layer


def hidden(mlp: MLPClassifier, x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ mlp.coefs_[0] + mlp.intercepts_[0], 0)


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of two feature sets, tdiff.evaluate's (robust to dead ReLU units)."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def judge(mlp, test_images: np.ndarray, images: torch.Tensor, requested: torch.Tensor) -> tuple[float, float]:
    x = images.flatten(1).numpy()
    accuracy = float((mlp.predict(x) == requested.numpy()).mean())
    return accuracy, fid(hidden(mlp, x), hidden(mlp, test_images))


def save_grid(folder: Path | None, name: str, images: torch.Tensor) -> None:
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        file = "".join(c if c.isalnum() or c in "-." else "_" for c in name) + ".png"
        save_png(image_grid(to_uint8(images[:100]), columns=10), folder / file)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per model, CPU minutes on one thread")
    parser.add_argument("--sample-threads", type=int, default=2, help="threads for sampling (not timed)")
    parser.add_argument("--chunk", type=int, default=20, help="steps per turn when alternating")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write a grid of the first 100 samples per row here")
    args = parser.parse_args()

    train_x, train_y, test_x, test_y = digits(args.seed)
    mlp = MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=0)
    mlp.fit(train_x.flatten(1).numpy(), train_y.numpy())
    test_flat = test_x.flatten(1).numpy()
    ceiling = mlp.score(test_flat, test_y.numpy())
    print(f"digits {SIZE}x{SIZE}: {len(train_x)} train / {len(test_x)} test; MLP judge accuracy on real test "
          f"images {ceiling:.3f}; {torch.get_num_threads()} threads\n")

    runs = {"plain": Run(False, args.seed), "TREAD 2..12 @ 0.5": Run(True, args.seed)}
    budget = args.minutes * 60
    torch.set_num_threads(1)
    while any(run.seconds < budget for run in runs.values()):
        for run in runs.values():  # alternate, so load on a shared machine falls on both
            if run.seconds < budget:
                run.train(train_x, train_y, args.chunk)
    torch.set_num_threads(args.sample_threads)

    requested = spread_labels(args.samples, 10)
    real_acc, real_fid = judge(mlp, test_flat, train_x[: args.samples], train_y[: args.samples])
    print(f"real training images as 'samples': accuracy {real_acc:.3f}, MLP-FID {real_fid:.2f}\n")
    print(f"| model | steps in {args.minutes:g} CPU-min | images per CPU-s | CPU s / wall s | EMA loss | accuracy | MLP-FID |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    samples = {}
    for name, run in runs.items():
        samples[name] = run.sample(args.samples, args.sample_steps)
        save_grid(args.out, name, samples[name])
        accuracy, score = judge(mlp, test_flat, samples[name], requested)
        rate = run.step * run.config.train.batch_size / run.seconds
        print(f"| {name} | {run.step} | {rate:.1f} | {run.seconds:.0f} / {run.wall:.0f} | {run.loss:.4f} | {accuracy:.3f} | {score:.2f} |")

    print(f"\nΔ-DiT cache, {args.sample_steps} DPM-Solver++(2M) steps, same noise as above\n")
    print("| model | cache (span:boundary:interval) | skipped | accuracy | MLP-FID | PSNR vs uncached, dB |")
    print("|---|---|---:|---:|---:|---:|")
    for name, run in runs.items():
        applications = run.config.sharing.depth * run.config.sharing.substeps
        default = CachePlan.default(args.sample_steps, applications)
        for plan in (default, CachePlan(applications // 2, default.boundary, 3)):
            cache = BlockCache(plan)
            cached = run.sample(args.samples, args.sample_steps, cache)
            save_grid(args.out, f"{name} cache {plan.span}-{plan.boundary}-{plan.interval}", cached)
            accuracy, score = judge(mlp, test_flat, cached, requested)
            print(f"| {name} | {plan.span}:{plan.boundary}:{plan.interval} | {cache.skipped_fraction:.1%} | "
                  f"{accuracy:.3f} | {score:.2f} | {psnr(cached, samples[name]):.1f} |")


if __name__ == "__main__":
    main()
