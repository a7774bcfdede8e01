"""Training throughput (images/s) and peak memory of tdiff presets on this machine.

    python bench/train_throughput.py --presets tiny,d2s8i,d16 --batch-size 64 --steps 5 \
        --mixed-precision no,bf16 --device cuda

Every (preset, precision) pair is one column-free row of the table, measured in a fresh child
process so one variant's memory peak cannot hide another's. A step is what `tdiff train` does
per optimiser step on one process: forward under autocast, backward, gradient clipping, AdamW,
EMA update, the same objective (`tdiff.train.TrainingObjective`) and σ/noise draws
(`tdiff.train.step_noise`). The data are random tensors already on the device (no DataLoader,
no augmentation), so the figures are the model's ceiling, not the input pipeline's.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` (tensors only, no allocator cache); on
the CPU, the growth of the process's peak resident set (`ru_maxrss`) from just before the model
is built, which also counts allocator slack and thread buffers.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

PRECISIONS = {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def measure(preset: str, precision: str, batch_size: int, steps: int, warmup: int, device: str,
            overrides: list[str], threads: int | None) -> dict:
    """One variant in this process: build, warm up, time `steps` optimiser steps."""
    import torch

    from tdiff.config import apply_overrides, load_preset
    from tdiff.diffusion import Denoiser
    from tdiff.ema import ema_decay, ema_update_
    from tdiff.model import ImageTransformer
    from tdiff.train import TrainingObjective, build_optimizer, step_noise

    if threads:
        torch.set_num_threads(threads)
    config = apply_overrides(load_preset(preset), overrides)
    m, t = config.model, config.train
    dev = torch.device(device)
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if dev.type == "cuda":  # TF32 left at torch's default (off for matmuls), as in `tdiff train`
        torch.cuda.reset_peak_memory_stats(dev)

    torch.manual_seed(0)
    net = ImageTransformer(m, config.sharing).to(dev)
    ema_net = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = build_optimizer(net, config)
    objective = TrainingObjective(Denoiser(net, config.diffusion.sigma_data), config).train()
    generator = torch.Generator().manual_seed(1)
    # Synthetic data, resident on the device: pixels in [-1, 1], labels, no augmentation (aug_cond 0).
    shape = (m.channels, m.image_size, m.image_size)
    images = (torch.rand((batch_size, *shape), generator=generator) * 2 - 1).to(dev)
    labels = torch.randint(0, max(m.num_classes, 1), (batch_size,), generator=generator).to(dev)
    aug_cond = torch.zeros(batch_size, 9, device=dev)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype is torch.float16)

    def step(k: int) -> float:
        draws = step_noise(0, k, batch_size, shape)
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = objective(images, draws.noise.to(dev), draws.u.to(dev), aug_cond,
                               labels if m.num_classes else None)
        scaler.scale(losses.mean()).backward()
        scaler.unscale_(optimizer)
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        ema_update_(ema_net, net, ema_decay(k, t.ema_inv_gamma, t.ema_power, 0.0, t.ema_max))
        return losses.detach()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for k in range(warmup):  # allocations, autotuning, first-touch: not timed
        step(k)
    sync()
    start = time.perf_counter()
    for k in range(warmup, warmup + steps):
        loss = step(k)
    sync()
    seconds = time.perf_counter() - start
    if dev.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 1024
    return {"preset": preset, "precision": precision, "device": str(dev), "batch_size": batch_size,
            "steps": steps, "warmup": warmup, "params": sum(p.numel() for p in net.parameters()),
            "seconds_per_step": seconds / steps, "images_per_second": batch_size * steps / seconds,
            "peak_memory_mib": peak_mib, "memory_kind": "cuda_max_allocated" if dev.type == "cuda" else
            "cpu_peak_rss_growth", "final_loss": float(loss.float().mean()),
            "threads": torch.get_num_threads()}


def run_variant(args, preset: str, precision: str) -> dict:
    """`measure` in a fresh interpreter, so the memory peak belongs to this variant alone."""
    command = [sys.executable, __file__, "--one", f"{preset}:{precision}", "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    command += [f"--set={item}" for item in args.overrides]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {"preset": preset, "precision": precision, "error": lines[-1] if lines else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], device: str) -> None:
    memory = "peak MiB (cuda max_memory_allocated)" if device.startswith("cuda") else "peak MiB (CPU RSS growth)"
    header = ["preset", "precision", "params", "batch", "s/step", "images/s", memory]
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["preset"], r["precision"], "-", "-", "-", "-", "error: " + r["error"]])
            continue
        cells.append([r["preset"], r["precision"], f"{r['params'] / 1e6:.2f}M", str(r["batch_size"]),
                      f"{r['seconds_per_step']:.3f}", f"{r['images_per_second']:.1f}", f"{r['peak_memory_mib']:.0f}"])
    first = next((r for r in rows if "error" not in r), None)
    title = (f"tdiff training throughput on {device}"
             + (f" ({first['threads']} threads), {first['steps']} timed steps after {first['warmup']} warm-up"
                if first else ""))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
        print(title)
        for line in [header, *cells]:
            print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        return
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right")
    for row in cells:
        table.add_row(*row)
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny", help="Comma-separated preset names or TOML files.")
    parser.add_argument("--mixed-precision", default="no",
                        help="Comma-separated: no (= fp32), bf16, fp16; each preset runs with each.")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per step.")
    parser.add_argument("--steps", type=int, default=5, help="Timed optimiser steps per variant.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps before timing.")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N]. [default: cuda if available]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads. [default: torch's]")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="Configuration override for every preset, e.g. --set model.checkpointing=true.")
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON instead of a table.")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: PRESET:PRECISION, in a child process
    args = parser.parse_args()
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.one:
        preset, precision = args.one.rsplit(":", 1)
        print(json.dumps(measure(preset, precision, args.batch_size, args.steps, args.warmup, args.device,
                                 args.overrides, args.threads)))
        return
    precisions = []
    for name in args.mixed_precision.split(","):
        if name.strip() not in PRECISIONS:
            parser.error(f"--mixed-precision {name}: choose from no, fp32, bf16, fp16")
        precisions.append(PRECISIONS[name.strip()])
    rows = []
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        for precision in dict.fromkeys(precisions):
            rows.append(run_variant(args, preset, precision))
            print(f"{preset} {precision}: {rows[-1].get('images_per_second', rows[-1].get('error'))}",
                  file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, args.device)


if __name__ == "__main__":
    main()
