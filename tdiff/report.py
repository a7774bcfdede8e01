"""Rows for `tdiff params`: sizes and costs of configurations, without allocating weights.

Models are built on the "meta" device: parameters have shapes but no storage, so counting a
width-1024 D16 takes milliseconds, and FLOPs are counted by running the real forward pass
under torch's FlopCounterMode on meta tensors.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from tdiff.config import Config, resolved_d_ff
from tdiff.model import build_model
from tdiff.sharing import order, table1_name


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
