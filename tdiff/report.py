"""Rows for `tdiff params` and `tdiff compare`: sizes and costs of configurations, runs side by side.

Models are built on the "meta" device: parameters have shapes but no storage, so counting a
width-1024 D16 takes milliseconds, and FLOPs are counted by running the real forward pass
under torch's FlopCounterMode on meta tensors.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from tdiff.config import Config, resolved_d_ff
from tdiff.diffusion import Denoiser
from tdiff.errors import UserError
from tdiff.hardware import synchronize
from tdiff.model import build_model
from tdiff.run import RunDir
from tdiff.sampler_registry import REGISTRY
from tdiff.sharing import order, table1_name
from tdiff.step import Trainer, seconds_per_step, synthetic_micro_batch


def forward_flops(config: Config) -> tuple[int, int]:
    """(projection FLOPs, attention-score FLOPs) of one forward pass on one image.

    Projection FLOPs are the matrix multiplies by weights (aten.mm): the figure the reference
    reports (3.313 GFLOP at effective depth 8, 6.609 at 16, width 512). Attention scores
    (q·kᵀ and attention·v, aten.bmm) are counted apart so both numbers stay comparable.
    """
    net = build_model(config.model, config.sharing, "meta").eval()
    m = config.model
    x = torch.zeros(1, m.channels, m.image_size, m.image_size, device="meta")
    c_noise = torch.zeros(1, device="meta")
    labels = torch.zeros(1, dtype=torch.long, device="meta") if m.num_classes else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, c_noise, class_cond=labels)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = sum(n for op, n in counts.items() if "bmm" in op or "attention" in op)
    return counter.get_total_flops() - attention, attention


def model_summary(config: Config, name: str = "") -> dict:
    """Parameter counts, depth and cost of a configuration, as one flat JSON-able dict."""
    net = build_model(config.model, config.sharing, "meta")
    total = sum(p.numel() for p in net.parameters())
    blocks = sum(p.numel() for p in net.blocks.parameters())
    mapping = sum(p.numel() for p in net.mapping.parameters())
    projection_flops, attention_flops = forward_flops(config)
    s = config.sharing
    return {
        "name": name,
        "table1_name": table1_name(s.depth, s.substeps, s.interleaved),
        "params_total": total,
        "params_blocks": blocks,
        "params_mapping": mapping,
        "params_other": total - blocks - mapping,
        "depth": s.depth,
        "substeps": s.substeps,
        "interleaved": s.interleaved,
        "effective_depth": s.depth * s.substeps,
        "order": order(net.schedule),
        "width": config.model.width,
        "d_ff": resolved_d_ff(config.model),
        "tokens": (config.model.image_size // config.model.patch_size) ** 2,
        "gflops_per_image": projection_flops / 1e9,
        "gflops_attention_per_image": attention_flops / 1e9,
        "param_bytes_fp32": 4 * total,
    }


# --------------------------------------------------------------------------------------------
# Runs side by side (`tdiff compare`): config.toml + the eval records of metrics.jsonl


def eval_records(records: list[dict], protocol: str | None = None) -> list[dict]:
    """The FID evaluations (kind "eval" with a fid), of one protocol if given, in file order.

    Evaluations sampled with the block cache (`eval --cache`) are left out: they measure the
    cache's approximation, not the checkpoint under the protocol.
    """
    return [
        r
        for r in records
        if r.get("kind") == "eval"
        and isinstance(r.get("fid"), (int, float))
        and isinstance(r.get("step"), int)
        and not r.get("cache")
        and (protocol is None or r.get("protocol") == protocol)
    ]


def log_records(records: list[dict]) -> list[dict]:
    """The training log records (no "kind", an int step, a numeric loss), one per step (the latest wins), by step."""
    by_step = {
        r["step"]: r
        for r in records
        if "kind" not in r and isinstance(r.get("step"), int) and isinstance(r.get("loss"), (int, float))
    }
    return [by_step[step] for step in sorted(by_step)]


def training_curves(run_dir: Path) -> dict[str, list[float]]:
    """A run's training log as columns for `compare --plot`: step, loss, ema_loss, elapsed_seconds
    (NaN where a record lacks one)."""
    records, _ = RunDir(run_dir).read_metrics()
    log = log_records(records)
    return {key: [_number(r.get(key)) for r in log] for key in ("step", "loss", "ema_loss", "elapsed_seconds")}


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def run_report(run_dir: Path, protocol: str | None) -> dict:
    """One run as a Table 1 column: its model summary, its evaluations and the best of them (lowest FID)."""
    run = RunDir(run_dir)  # config.toml and metrics.jsonl are all it needs
    config = run.read_config()
    if config is None:
        raise UserError(f"{run.path} is not a tdiff run directory (no config.toml)")
    records, skipped = run.read_metrics()
    evals = eval_records(records, protocol)
    by_step = {r["step"]: r for r in evals}  # the curve: one point per step, the latest record wins
    best = min(evals, key=lambda r: r["fid"]) if evals else None
    keep = ("step", "fid", "kid", "kid_x1e4", "n", "protocol")
    return {
        "name": run.path.name,
        "path": str(run.path),
        **model_summary(config, run.path.name),
        "evaluations": len(evals),
        "best": {k: best.get(k) for k in keep} if best else None,
        "curve": [{"step": s, "fid": by_step[s]["fid"]} for s in sorted(by_step)],
        "skipped_lines": skipped,
    }


def compare_runs(run_dirs: list[Path], protocol: str | None = None) -> dict:
    """Table 1 for runs: one entry per run. Without `protocol`, the single protocol the runs' evaluations
    share; runs evaluated under several must name one (their numbers are not comparable). Lines of a
    metrics.jsonl that are torn or not JSON are skipped and listed in the run's "skipped_lines"."""
    if protocol is None:
        found = sorted({str(r.get("protocol")) for d in run_dirs for r in eval_records(RunDir(d).read_metrics()[0])})
        if len(found) > 1:
            raise UserError(
                f"the runs hold evaluations under several protocols ({', '.join(found)}); pick one with --protocol"
            )
        protocol = found[0] if found else None
    return {"protocol": protocol, "runs": [run_report(Path(d), protocol) for d in run_dirs]}


# --------------------------------------------------------------------------------------------
# Measured speed (`tdiff compare --presets ... --measure`): synthetic data, a few steps


def measure_throughput(
    config: Config, device: str | torch.device = "cpu", *, batch_size: int = 8, iterations: int = 3
) -> dict:
    """Training and sampling images/s of a configuration on `device`, from random weights and data.

    Training: `tdiff train`'s own optimiser step (`tdiff.step.Trainer`: the four AdamW groups, EMA,
    clipping, float32) on a fixed batch of `batch_size` random images, after one warm-up step.
    Sampling: the time of one denoiser evaluation on `batch_size` images times the evaluations the
    config's [sample] sampler needs per image (steps, or 2·steps − 1 for heun/edm). Rough: a few
    iterations, no torch.compile.
    """
    from accelerate import Accelerator  # heavy; imported where used

    device = torch.device(device)
    config = replace(config, train=replace(config.train, batch_size=batch_size, grad_accum=1))
    m, d, s = config.model, config.diffusion, config.sample
    trainer = Trainer(config, Accelerator(cpu=device.type == "cpu"), seed=0)
    train_seconds, _ = seconds_per_step(trainer, synthetic_micro_batch(config, trainer.device), iterations, 1)
    net, denoiser = trainer.net, Denoiser(trainer.net, d.sigma_data)
    x = torch.randn(batch_size, m.channels, m.image_size, m.image_size, device=device)  # (B, C, H, W)
    sigma = torch.rand(batch_size, device=device) * 3 + 0.05
    labels = torch.randint(0, m.num_classes, (batch_size,), device=device) if m.num_classes else None

    def timed(step) -> float:
        step()  # warm-up: allocations, kernel selection
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iterations):
            step()
        synchronize(device)
        return (time.perf_counter() - start) / iterations

    net.eval()
    with torch.no_grad():
        call_seconds = timed(lambda: denoiser(x, sigma, class_cond=labels))
    nfe = REGISTRY[s.sampler].evaluations(s.steps)
    return {
        "device": str(device),
        "batch_size": batch_size,
        "train_images_per_second": batch_size / train_seconds,
        "sample_images_per_second": batch_size / (call_seconds * nfe),
        "sample_nfe": nfe,
        "sample_sampler": s.sampler,
        "sample_steps": s.steps,
    }
