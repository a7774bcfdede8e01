"""Where a training step's time goes: model-only vs the full loop, per preset, precision and --compile.

    python bench/train_throughput.py --presets tiny,d2s8i --batch-size 16 --steps 3
    python bench/train_throughput.py --presets d2s8i,d16 --mixed-precision bf16 --compile no,yes \
        --batch-size 256 --steps 20 --warmup 5 --device cuda
    python bench/train_throughput.py --presets d16,d8,d2s8i --batch-size 16 --full-loop no \
        --peer /work/peer/venv/bin/python            # tdiff vs k-diffusion 0.1.1, side by side

Each variant runs in a fresh child process, so one variant's memory peak cannot hide another's.
- model-only: `tdiff.step.Trainer.step` — the very step `tdiff train` runs (four AdamW groups, EMA,
  clipping, autocast, TF32 setting) — on a fixed synthetic micro-batch already on the device; with the
  full loop, measured before and after it and averaged;
- full loop: `tdiff.train.train` itself on an in-memory synthetic `.npz` (augment_prob 0.12, demo
  grids, evaluation and intermediate checkpoints off), its rate read from metrics.jsonl;
- ratio: full loop / model-only (1.0 = the input pipeline and the loop cost nothing);
- first step: seconds of the first step, which includes compilation under --compile;
- on CUDA: peak memory (max_memory_allocated), achieved TFLOP/s with FLOPs per image per step =
  3 × the forward FLOPs of `tdiff params` (projections + attention scores; TREAD presets counted
  unrouted, so their MFU is "effective"), and MFU against the GPU's dense bf16 peak (named in the title);
- on the CPU: the growth of the process's peak resident set instead, and step times are medians.
A last table gives the input pipeline alone (gather + batched augmentation on the device, batch 512);
--updates adds the per-parameter work of a step (clip + AdamW + EMA), one tensor at a time vs tdiff's.

--peer PYTHON runs ../shared/bench/kdiff_peer_bench.py (or --peer-script) with that interpreter
(k-diffusion 0.1.1.post1 in its own environment with the same torch; never a tdiff dependency) and
tdiff's model-only step in alternating rounds, at the same effective depth, width and batch.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRECISIONS = {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
DEFAULT_PEER_SCRIPT = Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "kdiff_peer_bench.py"


def variant_config(preset: str, batch_size: int, overrides: list[str]):
    from tdiff.config import apply_overrides, load_preset

    return apply_overrides(load_preset(preset), [f"train.batch_size={batch_size}", "train.grad_accum=1", *overrides])


def model_only(config, precision: str, compile_blocks: bool, device: str, steps: int, warmup: int) -> dict:
    """Images/s of Trainer.step on a synthetic device-resident micro-batch."""
    import torch
    from accelerate import Accelerator

    from tdiff import hardware
    from tdiff.step import Trainer, seconds_per_step, synthetic_micro_batch

    dev = torch.device(device)
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    hardware.reset_peak_memory(dev)
    accelerator = Accelerator(mixed_precision=ACCELERATE[precision], cpu=dev.type == "cpu")
    trainer = Trainer(config, accelerator, seed=0, compile_blocks=compile_blocks)
    seconds, first = seconds_per_step(trainer, synthetic_micro_batch(config, trainer.device), steps, warmup)
    peak = hardware.peak_memory_mib(dev)
    if peak is None:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 1024
    row = {
        "params": sum(p.numel() for p in trainer.net.parameters()),
        "first_step_seconds": first,
        "model_images_per_second": config.train.batch_size / seconds,
        "model_peak_mib": peak,
        "loss": trainer.read().loss,
    }
    del trainer
    gc.collect()
    return row


def full_loop(config, precision: str, compile_blocks: bool, device: str, steps: int, warmup: int) -> dict:
    """Images/s of `tdiff.train.train` on an in-memory .npz with augmentation, from its metrics.jsonl."""
    import numpy as np

    from tdiff.config import apply_overrides
    from tdiff.train import RunOptions, train

    m = config.model
    cpu = device == "cpu"
    # CPU: a record per step, median of the timed ones; GPU: one warm-up window, then one timed window.
    log_every = 1 if cpu else steps
    total = warmup + steps if cpu else steps * (1 + math.ceil(warmup / steps))
    config = apply_overrides(
        config,
        [
            f"train.steps={total}",
            f"train.log_every={log_every}",
            "train.demo_every=0",
            "train.eval_every=0",
            f"train.save_every={10**9}",
            "diffusion.augment_prob=0.12",
        ],
    )
    rng = np.random.default_rng(0)
    n = max(1024, 4 * config.train.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "data.npz"
        np.savez(
            npz,
            images=rng.integers(0, 256, (n, m.image_size, m.image_size, m.channels), dtype=np.uint8),
            labels=rng.integers(0, max(m.num_classes, 1), n),
        )
        options = RunOptions(
            data=str(npz),
            out=Path(tmp) / "run",
            mixed_precision=ACCELERATE[precision],
            cpu=cpu,
            compile=compile_blocks,
            num_workers=0,
        )
        train(config, options)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = records[-steps:] if cpu else records[-1:]
    return {
        "loop_images_per_second": statistics.median(r["images_per_second"] for r in timed),
        "loop_peak_mib": records[-1].get("peak_memory_mib"),
    }


def measure(preset: str, precision: str, compile_blocks: bool, args) -> dict:
    """One variant in this process."""
    import torch

    from tdiff import hardware
    from tdiff.report import forward_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    config = variant_config(preset, args.batch_size, args.overrides)
    row = {
        "preset": preset,
        "precision": precision,
        "compile": compile_blocks,
        "batch_size": args.batch_size,
        "device": args.device,
        "threads": torch.get_num_threads(),
    }
    row.update(model_only(config, precision, compile_blocks, args.device, args.steps, args.warmup))
    if args.full_loop == "yes":
        row.update(full_loop(config, precision, compile_blocks, args.device, args.steps, args.warmup))
        # Model-only again after the loop, averaged with the first: on a shared or thermally limited
        # machine whichever runs first is favoured, by 5-10 % on the development CPU.
        again = model_only(config, precision, compile_blocks, args.device, args.steps, args.warmup)
        row["model_images_per_second"] = (row["model_images_per_second"] + again["model_images_per_second"]) / 2
        row["loop_over_model"] = row["loop_images_per_second"] / row["model_images_per_second"]
    projection, attention = forward_flops(config)
    row["gflop_per_image_step"] = 3 * (projection + attention) / 1e9
    best = max(row["model_images_per_second"], row.get("loop_images_per_second", 0.0))
    row["tflops"] = best * row["gflop_per_image_step"] / 1e3
    peak = hardware.dense_bf16_peak_tflops(torch.device(args.device))
    if peak is not None:
        row["peak_tflops"], row["gpu"] = peak
        row["mfu"] = row["tflops"] / row["peak_tflops"]
    row["device_description"] = hardware.describe(torch.device(args.device))
    return row


def pipeline_speed(device: str, batch_size: int, prob: float, batches: int) -> float:
    """Images/s of the input pipeline alone: gather from the device-resident uint8 set, augment."""
    import numpy as np
    import torch

    from tdiff import hardware
    from tdiff.data import ArrayDataset, ImageData
    from tdiff.pipeline import TrainingBatches

    dev = torch.device(device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10_000, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 10_000)
    data = ImageData(ArrayDataset(images, labels), "synthetic", 3, 32, 10, tuple("0123456789"), labels)
    stream = TrainingBatches(data, 0, prob, dev, batch_size, 0, 1, 1, 0, batches + 2, num_workers=0)
    stream.micro_batch(0, 0)  # warm-up
    hardware.synchronize(dev)
    began = time.perf_counter()
    for step in range(1, batches + 1):
        stream.micro_batch(step, 0)
    hardware.synchronize(dev)
    return batch_size * batches / (time.perf_counter() - began)


def update_speed(preset: str, overrides: list[str], repeats: int = 5) -> dict:
    """Seconds of the per-parameter work of one step (clip + AdamW + EMA) on the CPU: one tensor at a
    time, as k-diffusion 0.1.1 runs it on a CPU, against tdiff's step (fused AdamW from
    `tdiff.step.build_optimizer`, torch's default clipping, the one-call foreach EMA). It does not depend
    on the autocast precision (weights, gradients and moments are fp32) and weighs the more the more
    parameters a model has and the faster its forward and backward run."""
    import copy

    import torch

    from tdiff.config import apply_overrides, load_preset
    from tdiff.ema import ema_update_
    from tdiff.model import ImageTransformer, param_groups
    from tdiff.step import build_optimizer

    config = apply_overrides(load_preset(preset), overrides)
    t = config.train
    torch.manual_seed(0)
    net = ImageTransformer(config.model, config.sharing)
    ema = copy.deepcopy(net).requires_grad_(False)
    for p in net.parameters():
        p.grad = torch.randn_like(p) * 1e-3

    def one_at_a_time(optimizer):
        torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip, foreach=False)
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), net.parameters()):
                e.mul_(0.999).add_(p, alpha=0.001)

    def tdiffs(optimizer):
        torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
        optimizer.step()
        ema_update_(ema, net, 0.999)

    def timed(update, optimizer) -> float:
        update(optimizer)  # creates the moments
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            update(optimizer)
            times.append(time.perf_counter() - began)
        return statistics.median(times)

    groups = param_groups(net, t.lr, t.weight_decay, t.mapping_lr_scale)
    loop = timed(one_at_a_time, torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, foreach=False))
    ours = timed(tdiffs, build_optimizer(net, config))
    return {"preset": preset, "params": sum(p.numel() for p in net.parameters()), "one_at_a_time": loop, "tdiff": ours}


# ------------------------------------------------------------------------------------------------
# Child processes, the peer, tables


def run_child(args, preset: str, precision: str, compile_blocks: bool, full_loop_flag: str | None = None) -> dict:
    command = [
        sys.executable,
        __file__,
        "--one",
        f"{preset}:{precision}:{int(compile_blocks)}",
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--full-loop",
        full_loop_flag or args.full_loop,
    ]
    command += [f"--set={item}" for item in args.overrides]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {
            "preset": preset,
            "precision": precision,
            "compile": compile_blocks,
            "error": lines[-1] if lines else f"exit {result.returncode}",
        }
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_peer(args, preset: str, precision: str) -> float | None:
    """k-diffusion's images/s for the same effective depth, width and batch; None if it failed."""
    config = variant_config(preset, args.batch_size, args.overrides)
    depth = config.sharing.depth * config.sharing.substeps
    command = [
        args.peer,
        str(args.peer_script),
        str(depth),
        str(config.model.width),
        str(args.batch_size),
        str(args.steps),
        precision,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    found = re.search(r"images/s=([0-9.]+)", result.stdout)
    if not found:
        print(f"peer failed for {preset} {precision}: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return float(found.group(1))


def print_table(title: str, header: list[str], cells: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 3 else "right")
    for row in cells:
        table.add_row(*row)
    Console(width=200).print(table)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def variant_cells(rows: list[dict]) -> list[list[str]]:
    cells = []
    for r in rows:
        head = [r["preset"], r["precision"], "yes" if r["compile"] else "no"]
        if "error" in r:
            cells.append(head + ["error: " + r["error"]] + [""] * 8)
            continue
        cells.append(
            head
            + [
                f"{r['params'] / 1e6:.2f}M",
                str(r["batch_size"]),
                _fmt(r["model_images_per_second"], ".1f"),
                _fmt(r.get("loop_images_per_second"), ".1f"),
                _fmt(r.get("loop_over_model"), ".2f"),
                _fmt(r["first_step_seconds"], ".1f"),
                _fmt(r["model_peak_mib"], ".0f"),
                _fmt(r["tflops"], ".2f"),
                _fmt(r.get("mfu"), ".1%"),
            ]
        )
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny", help="Comma-separated preset names or TOML files.")
    parser.add_argument("--mixed-precision", default="no", help="Comma-separated: no (= fp32), bf16, fp16.")
    parser.add_argument("--compile", default="no", help="Comma-separated: no, yes (regional torch.compile).")
    parser.add_argument("--full-loop", default="yes", choices=["yes", "no"], help="Also time tdiff.train.train.")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per step.")
    parser.add_argument("--steps", type=int, default=5, help="Timed optimiser steps per variant.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps before timing.")
    parser.add_argument("--pipeline-batch", type=int, default=512, help="Batch of the input-pipeline line; 0 = skip.")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N]. [default: cuda if available]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads. [default: torch's]")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="Configuration override for every preset, e.g. --set model.width=256.",
    )
    parser.add_argument("--peer", default=None, metavar="PYTHON", help="Interpreter with k-diffusion 0.1.1.")
    parser.add_argument("--peer-script", default=str(DEFAULT_PEER_SCRIPT), help="The peer's benchmark script.")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating tdiff/peer rounds per variant.")
    parser.add_argument(
        "--updates",
        action="store_true",
        help="Also time clip + AdamW + EMA alone, one tensor at a time vs tdiff's (CPU).",
    )
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON instead of tables.")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: PRESET:PRECISION:COMPILE in a child
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        preset, precision, compiled = args.one.rsplit(":", 2)
        print(json.dumps(measure(preset, precision, compiled == "1", args)))
        return

    precisions = list(dict.fromkeys(PRECISIONS[p.strip()] for p in args.mixed_precision.split(",")))
    compiles = list(dict.fromkeys(c.strip() == "yes" for c in args.compile.split(",")))
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    rows, peers = [], []
    for preset in presets:
        for precision in precisions:
            for compiled in compiles:
                rows.append(run_child(args, preset, precision, compiled))
                print(
                    f"{preset} {precision} compile={compiled}: "
                    f"{rows[-1].get('model_images_per_second', rows[-1].get('error'))}",
                    file=sys.stderr,
                )
            if args.peer:
                peers.append(peer_rounds(args, preset, precision))
    pipeline = []
    if args.pipeline_batch:
        for prob in (0.12, 0.0):
            pipeline.append((prob, pipeline_speed(args.device, args.pipeline_batch, prob, 20)))
    updates = [update_speed(preset, args.overrides) for preset in presets] if args.updates else []
    if args.json:
        print(json.dumps({"variants": rows, "peer": peers, "pipeline": pipeline, "updates": updates}, indent=2))
        return
    report(args, rows, peers, pipeline, updates)


def peer_rounds(args, preset: str, precision: str) -> dict:
    """tdiff model-only and k-diffusion, alternating, `rounds` times; the median of each and their ratio."""
    ours, theirs = [], []
    for _ in range(args.rounds):
        row = run_child(args, preset, precision, False, full_loop_flag="no")
        ours.append(row.get("model_images_per_second", math.nan))
        theirs.append(run_peer(args, preset, precision) or math.nan)
    tdiff_rate, peer_rate = statistics.median(ours), statistics.median(theirs)
    return {
        "preset": preset,
        "precision": precision,
        "tdiff": tdiff_rate,
        "k_diffusion": peer_rate,
        "ratio": tdiff_rate / peer_rate,
        "rounds": args.rounds,
        "tdiff_each": ours,
        "k_diffusion_each": theirs,
    }


def report(args, rows: list[dict], peers: list[dict], pipeline: list[tuple[float, float]], updates: list[dict]) -> None:
    first = next((r for r in rows if "error" not in r), {})
    peak = f", MFU vs {first['gpu']} dense bf16 peak {first['peak_tflops']:.0f} TFLOP/s" if "mfu" in first else ""
    memory = "peak MiB" + (" (cuda max allocated)" if args.device.startswith("cuda") else " (CPU RSS growth)")
    print_table(
        f"tdiff training step on {first.get('device_description', args.device)}: batch {args.batch_size}, "
        f"{args.steps} timed steps after {args.warmup} warm-up{peak}",
        [
            "preset",
            "precision",
            "compile",
            "params",
            "batch",
            "model-only img/s",
            "full loop img/s",
            "loop/model",
            "first step s",
            memory,
            "TFLOP/s",
            "MFU",
        ],
        variant_cells(rows),
    )
    if peers:
        print_table(
            f"tdiff vs k-diffusion 0.1.1 (model-only step, median of {args.rounds} alternating rounds, "
            f"batch {args.batch_size})",
            ["preset", "precision", "-", "tdiff img/s", "k-diffusion img/s", "tdiff / k-diffusion"],
            [
                [p["preset"], p["precision"], "", f"{p['tdiff']:.2f}", f"{p['k_diffusion']:.2f}", f"{p['ratio']:.2f}x"]
                for p in peers
            ],
        )
    if pipeline:
        print_table(
            f"input pipeline alone on {args.device} (device-resident uint8, batched augmentation)",
            ["augment_prob", "batch", "-", "images/s"],
            [[f"{prob:g}", str(args.pipeline_batch), "", f"{rate:,.0f}"] for prob, rate in pipeline],
        )
    if updates:
        print_table(
            "per-parameter work of one step on the CPU: clip + AdamW + EMA, ms (median)",
            ["preset", "params", "-", "one tensor at a time", "tdiff (fused AdamW)", "speed-up"],
            [
                [
                    u["preset"],
                    f"{u['params'] / 1e6:.2f}M",
                    "",
                    f"{u['one_at_a_time'] * 1e3:.1f}",
                    f"{u['tdiff'] * 1e3:.1f}",
                    f"{u['one_at_a_time'] / u['tdiff']:.2f}x",
                ]
                for u in updates
            ],
        )


if __name__ == "__main__":
    main()
