"""Sampling and evaluation speed: images/s per sampler, steps, precision, --compile and Δ-DiT cache,
and what that makes of the paper's protocol (2,000 images) and of FID-50K.

    python bench/sampling.py                                    # d2s8i at width 512, batch 16, this device
    python bench/sampling.py --presets d2s8i,d16 --steps 50 --precisions no,bf16 --compile no,yes --cache 0,2
    python bench/sampling.py --samplers euler,heun,dpmpp_2m,dpmpp_3m_sde --steps 20
    python bench/sampling.py --full 50000 --steps 50           # and one timed FID-50K run end to end

Every variant samples through the very calls `tdiff sample` and `tdiff eval` make
(`tdiff.sample.prepare_inference`, then `sample_batch`): its images/s are whole sampler runs of
--steps steps on one batch (the first batch, which includes compilation, is timed apart as "first
batch s"), images of the preset's size, random weights (speed does not depend on them), class labels
0, 1, ... and the preset's guidance scale. TFLOP/s counts the network's forward FLOPs (`tdiff params`:
projections + attention scores) of every image the network saw, guidance's doubled batch included.

Projections, per variant: the paper's protocol = 2,000 images by 50 DPM-Solver++(2M) SDE steps
(scaled from the measured --steps; one network evaluation per step, like every one-evaluation
sampler) plus their Inception features with k-diffusion's resize; FID-50K = 50,000 images by the
variant's sampler and steps plus features with clean-fid's resize. The reference statistics are
cached after the first evaluation and not counted. Features come from clean-fid's Inception when its
weights are found (--inception, $TDIFF_INCEPTION or tdiff's cache); otherwise from torchvision's
Inception-v3 with random weights (the same architecture and FLOPs), which the table says.

--full N then runs N images end to end with the first preset's fastest variant without cache (or
--full-variant): sampling, then features, what `tdiff eval -n N` spends after its reference is
cached; it prints the wall time. On a CPU without
native bf16, bf16/fp16 variants are skipped (about 100x slower there) unless --precisions names them.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from tdiff import hardware
from tdiff.acceleration import BlockCache, CachePlan
from tdiff.config import Config, apply_overrides, load_preset, with_values
from tdiff.diffusion import Denoiser
from tdiff.errors import UserError
from tdiff.evaluate import InceptionExtractor, extract_features, generate, load_inception, quantised
from tdiff.model import build_model
from tdiff.report import forward_flops
from tdiff.sample import (
    SamplingPlan,
    compile_for_sampling,
    prepare_inference,
    resolve_device,
    sample_batch,
    spread_labels,
)

PAPER_N, PAPER_STEPS, FID_N = 2000, 50, 50_000


COMPILE_MODES = {"no": None, "yes": "default", "graphs": "reduce-overhead"}  # --compile values -> torch.compile mode


@dataclass(frozen=True)
class Variant:
    preset: str
    sampler: str
    steps: int
    precision: str
    compile: str  # a COMPILE_MODES key: no, yes (`tdiff sample --compile`), graphs (CUDA graphs, CUDA only)
    cache: int  # Δ-DiT interval; 0 = no cache

    @property
    def label(self) -> str:
        cache = f"every {self.cache}" if self.cache else "-"
        return f"{self.preset} | {self.sampler} | {self.steps} | {self.precision} | {self.compile} | {cache}"


def parse_variant(spec: str) -> tuple[str, str, int]:
    """'bf16+compile+cache2' -> (precision, compile, cache interval); parts: a precision, then optionally
    'compile' or 'graphs' and 'cacheK'."""
    precision, *parts = spec.split("+")
    compile_mode, cache = "no", 0
    for part in parts:
        if part in ("compile", "graphs"):
            compile_mode = "yes" if part == "compile" else "graphs"
        elif part.startswith("cache") and part[5:].isdigit():
            cache = int(part[5:])
        else:
            raise SystemExit(f"--variants {spec}: unknown part {part!r} (compile, graphs, cacheK)")
    return precision, compile_mode, cache


def preset_config(name: str, width: int | None) -> Config:
    return apply_overrides(load_preset(name), [f"model.width={width}"] if width else [])


def random_denoiser(config: Config, device: torch.device, seed: int = 0) -> Denoiser:
    """The preset's model with random weights, zero-initialised branches filled so every block works."""
    torch.manual_seed(seed)
    net = build_model(config.model, config.sharing)
    with torch.no_grad():
        for param in net.parameters():
            if not param.any():
                param.normal_(0, 0.02)
    return Denoiser(net, config.diffusion.sigma_data).eval().requires_grad_(False).to(device)


class RowCounter:
    """Counts the images the network evaluates (a forward pre-hook), for TFLOP/s."""

    def __init__(self, net: torch.nn.Module):
        self.rows = 0
        self.handle = net.register_forward_pre_hook(self.count)

    def count(self, module, args) -> None:
        self.rows += args[0].shape[0]


def time_variant(variant: Variant, config: Config, device: torch.device, batch_size: int | None, repeats: int) -> dict:
    """Images/s of whole sampler runs on one batch, after a first (compiling) batch timed apart."""
    config = with_values(config, sample__sampler=variant.sampler, sample__steps=variant.steps, sample__eta=0.0)
    plan = SamplingPlan.from_config(config)
    m = config.model
    denoiser = random_denoiser(config, device)
    applications = config.sharing.depth * config.sharing.substeps
    cache = (
        BlockCache(CachePlan.default(variant.steps, applications, interval=variant.cache)) if variant.cache else None
    )
    net_kwargs = {"block_cache": cache} if cache else {}
    inference = prepare_inference(
        denoiser,
        config,
        plan,
        device,
        10**9,
        precision=variant.precision,
        compile=variant.compile == "yes",
        batch_size=batch_size,
        cached=cache is not None,
    )
    if variant.compile == "graphs":
        compile_for_sampling(inference.denoiser, mode=COMPILE_MODES["graphs"])
    batch = inference.batch_size
    labels = spread_labels(batch, m.num_classes) if m.num_classes else None
    counter = RowCounter(denoiser.inner)

    def run(first_seed: int) -> float:
        hardware.synchronize(device)
        started = time.perf_counter()
        sample_batch(
            inference.denoiser,
            plan,
            list(range(first_seed, first_seed + batch)),
            labels,
            (m.channels, m.image_size, m.image_size),
            m.num_classes,
            device,
            **net_kwargs,
        )
        hardware.synchronize(device)
        return time.perf_counter() - started

    hardware.reset_peak_memory(device)
    first = run(0)
    counter.rows = 0
    seconds = [run(batch * (k + 1)) for k in range(repeats)]
    rate = batch / statistics.median(seconds)
    rows_per_image = counter.rows / (batch * repeats)
    flops = sum(forward_flops(config))
    return {
        "batch": batch,
        "first": first,
        "rate": rate,
        "tflops": rate * rows_per_image * flops / 1e12,
        "skipped": cache.skipped_fraction if cache else 0.0,
        "peak": hardware.peak_memory_mib(device),
        "denoiser": inference.denoiser,
        "config": config,
        "plan": plan,
        "net_kwargs": net_kwargs,
    }


def random_inception(device: torch.device):
    """torchvision's Inception-v3 architecture with random weights: clean-fid's FLOPs, not its features."""
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    net.fc = torch.nn.Identity()
    return net.eval().to(device)


def feature_extractor(resize: str, device: torch.device, inception: str | None) -> tuple[InceptionExtractor, str]:
    try:
        return load_inception(inception, device=device, resize=resize), "clean-fid Inception"
    except UserError:
        return (
            InceptionExtractor(random_inception(device), device, resize, key="random"),
            "torchvision Inception-v3, random weights (weights not found)",
        )


def feature_rate(extractor: InceptionExtractor, size: int, channels: int, n: int, batch: int) -> float:
    """Images/s through resize + Inception, on n random images after one warm-up batch."""
    images = np.random.default_rng(0).integers(0, 256, (n + batch, size, size, channels), dtype=np.uint8)
    extract_features(images[:batch], extractor, batch_size=batch)
    started = time.perf_counter()
    extract_features(images[batch:], extractor, batch_size=batch)
    return n / (time.perf_counter() - started)


def full_run(best: dict, n: int, extractor: InceptionExtractor, device: torch.device, batch: int) -> dict:
    """N images end to end as `tdiff eval -n N` makes them (clean protocol: uint8), then their features."""
    config, m = best["config"], best["config"].model
    labels = spread_labels(n, m.num_classes) if m.num_classes else None
    started = time.perf_counter()
    images = generate(
        best["denoiser"],
        config,
        best["plan"],
        n,
        labels=labels,
        batch_size=best["batch"],
        device=device,
        **best["net_kwargs"],
    )
    sampled = time.perf_counter()
    extract_features(quantised(images), extractor, batch_size=batch)
    return {
        "sample": sampled - started,
        "features": time.perf_counter() - sampled,
        "total": time.perf_counter() - started,
    }


def duration(seconds: float) -> str:
    return f"{seconds:,.1f} s" if seconds < 120 else f"{seconds / 60:,.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="d2s8i")
    parser.add_argument("--width", type=int, default=None, help="override model.width [default: the preset's]")
    parser.add_argument("--image-size", type=int, default=None, help="override model.image_size")
    parser.add_argument("--samplers", default="dpmpp_2m")
    parser.add_argument("--steps", default="20", help="comma list of sampler steps")
    parser.add_argument(
        "--precisions", default=None, help="comma list of no, bf16, fp16 [default: no, plus bf16 where it is native]"
    )
    parser.add_argument("--compile", default="no", help="comma list of no, yes, graphs (torch.compile's CUDA graphs)")
    parser.add_argument("--cache", default="0", help="comma list of Δ-DiT intervals; 0 = no cache")
    parser.add_argument(
        "--variants",
        default=None,
        help="instead of --precisions x --compile x --cache: a comma list such as "
        "no,bf16,bf16+compile,bf16+compile+cache2,bf16+graphs",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="[default: 16 on the CPU; on CUDA what `tdiff sample` picks: the most that fit]",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per variant")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--feature-batch", type=int, default=None, help="[default: 50 on the CPU, 500 on CUDA]")
    parser.add_argument("--feature-images", type=int, default=None, help="[default: 100 on the CPU, 5000 on CUDA]")
    parser.add_argument("--inception", default=None, help="clean-fid's Inception weights file")
    parser.add_argument("--full", type=int, default=0, help="also run this many images end to end")
    parser.add_argument(
        "--full-variant",
        default=None,
        help="the variant of the first preset --full runs, e.g. bf16+compile [default: the fastest one without cache]",
    )
    args = parser.parse_args()

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batch_size = args.batch_size or (None if cuda else 16)
    native = hardware.bf16_is_native(device)
    precisions = (args.precisions or ("no,bf16" if native else "no")).split(",")
    if args.variants:
        settings = [parse_variant(spec) for spec in args.variants.split(",")]
    else:
        settings = [(q, c, int(k)) for q in precisions for c in args.compile.split(",") for k in args.cache.split(",")]
    variants = [
        Variant(p, s, int(n), q, c, k)
        for p in args.presets.split(",")
        for s in args.samplers.split(",")
        for n in args.steps.split(",")
        for q, c, k in settings
    ]
    print(f"# {hardware.describe(device)}; torch {torch.__version__}\n")
    if not native and args.precisions is None and args.variants is None:
        print("bf16 skipped: emulated on this device (about 100x slower than float32); --precisions no,bf16 runs it\n")

    feature_batch = args.feature_batch or (500 if cuda else 50)
    feature_images = args.feature_images or (5000 if cuda else 100)
    first = preset_config(variants[0].preset, args.width)
    if args.image_size:
        first = with_values(first, model__image_size=args.image_size)
    m = first.model
    try:
        extractors = {resize: feature_extractor(resize, device, args.inception) for resize in ("clean", "kdiffusion")}
        features = {
            resize: feature_rate(extractor, m.image_size, m.channels, feature_images, feature_batch)
            for resize, (extractor, _) in extractors.items()
        }
        print(
            f"Inception features ({extractors['clean'][1]}), {m.image_size}x{m.image_size} images, batch "
            f"{feature_batch}: {features['clean']:,.0f} images/s with clean-fid's resize, "
            f"{features['kdiffusion']:,.0f} with k-diffusion's\n"
        )
    except ImportError as error:  # clean-fid's resize or torchvision's Inception missing: sampling only
        extractors, features = {}, {"clean": math.inf, "kdiffusion": math.inf}
        print(f"Inception features not measured ({error}); the projections count sampling only\n")

    print(
        "| preset | sampler | steps | precision | compile | cache | batch | images/s | TFLOP/s | first batch s "
        "| skipped | peak MiB | paper protocol (2,000) | FID-50K |"
    )
    print("|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for variant in variants:
        config = preset_config(variant.preset, args.width)
        if args.image_size:
            config = with_values(config, model__image_size=args.image_size)
        try:
            result = time_variant(variant, config, device, batch_size, args.repeats)
        except Exception as error:  # noqa: BLE001 - one variant failing (memory, a compiler) must not hide the rest
            print(f"| {variant.label} | failed: {type(error).__name__}: {str(error).splitlines()[0][:120]} |")
            continue
        paper = PAPER_N * PAPER_STEPS / variant.steps / result["rate"] + PAPER_N / features["kdiffusion"]
        fid50k = FID_N / result["rate"] + FID_N / features["clean"]
        peak = f"{result['peak']:,.0f}" if result["peak"] is not None else "-"
        print(
            f"| {variant.label} | {result['batch']} | {result['rate']:,.1f} | {result['tflops']:.2f} | "
            f"{result['first']:.1f} | {result['skipped']:.0%} | {peak} | {duration(paper)} | {duration(fid50k)} |"
        )
        sys.stdout.flush()
        results.append((variant, result))

    if args.full and results and extractors:
        first_preset = [(v, r) for v, r in results if v.preset == variants[0].preset]
        wanted = parse_variant(args.full_variant) if args.full_variant else None
        chosen = (
            [(v, r) for v, r in first_preset if (v.precision, v.compile, v.cache) == wanted]
            if wanted
            else [(v, r) for v, r in first_preset if not v.cache] or first_preset
        )
        if not chosen:
            raise SystemExit(f"--full-variant {args.full_variant}: not among the variants measured")
        variant, best = max(chosen, key=lambda item: item[1]["rate"])
        timing = full_run(best, args.full, extractors["clean"][0], device, feature_batch)
        print(
            f"\n{args.full:,} images end to end ({variant.label.replace(' | ', ', ')}, batch {best['batch']}): "
            f"sampling {duration(timing['sample'])}, features {duration(timing['features'])}, "
            f"total {duration(timing['total'])}"
        )


if __name__ == "__main__":
    main()
