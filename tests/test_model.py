"""The denoiser network (spec §1, §2, §3): exact sizes, sharing semantics, and its layers.

Exact counts build width-512/1024 models on the "meta" device (shapes, no storage). Everything
that runs numbers uses width 64, head_dim 32, 16×16 images and float64, so the suite stays fast
and comparisons can be tight.
"""

import math

import numpy as np
import pytest
import torch
from nets import perturb_
from torch.func import functional_call

from tdiff import hardware
from tdiff.config import TABLE1_PRESETS, ModelConfig, SharingConfig, apply_overrides, load_preset, resolved_d_ff
from tdiff.errors import UserError
from tdiff.model import (
    AxialRoPE,
    QKNorm,
    SelfAttention,
    buffer_count,
    build_model,
    param_groups,
    parameter_count,
    patch_positions,
)
from tdiff.report import model_summary

# ------------------------------------------------------------------------------------------------
# Helpers


def configs(
    width=64,
    head_dim=32,
    depth=2,
    substeps=1,
    interleaved=True,
    num_classes=10,
    repeat_conditioning="scale",
    **model_kw,
):
    model_kw = {"image_size": 16, "dropout": 0.0, **model_kw}
    model = ModelConfig(width=width, head_dim=head_dim, num_classes=num_classes, **model_kw)
    sharing = SharingConfig(
        depth=depth, substeps=substeps, interleaved=interleaved, repeat_conditioning=repeat_conditioning
    )
    return model, sharing


def small_net(seed=0, perturb=True, **kw):
    """A float64 width-64 model; `perturb` fills the zero-initialised weights with noise."""
    torch.manual_seed(seed)
    net = build_model(*configs(**kw)).double().eval()
    if perturb:
        perturb_(net, seed + 1000)  # zero-init weights make every branch vanish: small random values instead
    return net


def inputs(net, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = net.pos.shape[0]  # tokens
    side = int(math.isqrt(size)) * net.patch_size
    x = torch.randn(n, 3, side, side, generator=g, dtype=torch.float64)
    c_noise = torch.randn(n, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (n,), generator=g)
    return x, c_noise, labels


def n_params(model, sharing):
    return sum(p.numel() for p in build_model(model, sharing, "meta").parameters())


def patchify(x, p):
    """Reference patching written out: feature index = c·p² + i·p + j, tokens row-major."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # n, gy, gx, c, i, j
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(tokens, p, c, h, w):
    n = tokens.shape[0]
    x = tokens.reshape(n, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)  # n, c, gy, i, gx, j
    return x.reshape(n, c, h, w)


def manual_forward(net, x, c_noise, labels, applications, blocks_call=None):
    """The network unrolled by hand: mapping once, then (block, multiplier) pairs in order."""
    cond = net.condition(c_noise, None, labels)
    tokens = net.in_proj(patchify(x, net.patch_size))
    for i, (b, multiplier) in enumerate(applications):
        if blocks_call is None:
            tokens = net.blocks[b](tokens, net.pos, cond * multiplier)
        else:
            tokens = blocks_call(i, b, tokens, cond * multiplier)
    out = net.out_proj(net.out_norm(tokens))
    return unpatchify(out, net.patch_size, *x.shape[1:])


# ------------------------------------------------------------------------------------------------
# Parameter counts (spec §3)

W512 = {
    "D16": (16, 1, 64_680_064),
    "D8": (8, 1, 34_793_536),
    "D2S4": (2, 4, 12_378_640),
    "D2S8": (2, 8, 12_378_640),
    "D1S8": (1, 8, 8_642_824),
    "D1S16": (1, 16, 8_642_824),
}
W1024 = {
    "D16": (16, 1, 258_597_120),
    "D8": (8, 1, 139_055_232),
    "D2S4": (2, 4, 49_398_816),
    "D2S8": (2, 8, 49_398_816),
    "D1S8": (1, 8, 34_456_080),
    "D1S16": (1, 16, 34_456_080),
}


@pytest.mark.parametrize("width, table", [(512, W512), (1024, W1024)])
@pytest.mark.parametrize("interleaved", [True, False])
def test_exact_parameter_counts(width, table, interleaved):
    for name, (depth, substeps, total) in table.items():
        model = ModelConfig(width=width)  # class-conditional CIFAR-10, 3×32×32, patch 4
        sharing = SharingConfig(depth=depth, substeps=substeps, interleaved=interleaved)
        assert n_params(model, sharing) == total, name


# blocks, mapping net, other: spec §3.1 / §3.2, per distinct block count.
SPLITS = {
    512: {16: 59_773_056, 8: 29_886_528, 2: 7_471_632, 1: 3_735_816, "mapping": 4_327_424, "other": 579_584},
    1024: {16: 239_083_776, 8: 119_541_888, 2: 29_885_472, 1: 14_942_736, "mapping": 17_305_600, "other": 2_207_744},
}


@pytest.mark.parametrize("width", [512, 1024])
@pytest.mark.parametrize("depth", [16, 8, 2, 1])
def test_split_blocks_mapping_other(width, depth):
    net = build_model(ModelConfig(width=width), SharingConfig(depth=depth, substeps=2), "meta")
    blocks = sum(p.numel() for p in net.blocks.parameters())
    mapping = sum(p.numel() for p in net.mapping.parameters())
    total = sum(p.numel() for p in net.parameters())
    assert blocks == SPLITS[width][depth]
    assert mapping == SPLITS[width]["mapping"]
    assert total - blocks - mapping == SPLITS[width]["other"]


def closed_form(w, f, depth, num_classes, channels, patch, head_dim=64, mapping_layers=2):
    """Spec §3.3, with the per-head and mapping-depth terms written for any head_dim and depth."""
    n_h, P = w // head_dim, channels * patch * patch
    block = 6 * w * w + 3 * w * f + n_h * (1 + 2 * head_dim // 4)  # 33 per head at d_h = 64
    mapping = mapping_layers * (3 * w * f + w) + 2 * w
    classes = (num_classes + 1) * w if num_classes else 0
    other = 2 * w * w + classes + 2 * P * w + w
    return depth * block + mapping + other


@pytest.mark.parametrize("width, head_dim", [(128, 64), (256, 64), (384, 64), (512, 64), (768, 64), (256, 32)])
@pytest.mark.parametrize(
    "depth, num_classes, channels, patch", [(1, 10, 3, 4), (3, 0, 3, 4), (5, 100, 1, 2), (2, 10, 3, 8)]
)
def test_closed_form(width, head_dim, depth, num_classes, channels, patch):
    model = ModelConfig(width=width, head_dim=head_dim, num_classes=num_classes, channels=channels, patch_size=patch)
    for substeps in (1, 3):
        got = n_params(model, SharingConfig(depth=depth, substeps=substeps))
        assert got == closed_form(width, resolved_d_ff(model), depth, num_classes, channels, patch, head_dim)


def test_closed_form_matches_spec_3_3_literally_at_head_dim_64():
    w, f, depth = 512, 1408, 2
    spec = depth * (6 * w * w + 3 * w * f + 33 * w // 64) + 6 * w * f + 2 * w * w + 11 * w + 101 * w
    assert spec == closed_form(w, f, depth, 10, 3, 4) == 12_378_640


@pytest.mark.parametrize("width", [512, 1024])
def test_unconditional_drops_the_class_table(width):
    sharing = SharingConfig(depth=2, substeps=8)
    conditional = n_params(ModelConfig(width=width, num_classes=10), sharing)
    unconditional = n_params(ModelConfig(width=width, num_classes=0), sharing)
    assert conditional - unconditional == 11 * width  # (num_classes + 1) · w
    assert build_model(ModelConfig(num_classes=0), sharing, "meta").class_emb is None


TABLE1_COUNTS = {
    "d16": 64_680_064,
    "d8": 34_793_536,
    "d1s16": 8_642_824,
    "d1s8": 8_642_824,
    "d2s4ui": 12_378_640,
    "d2s4i": 12_378_640,
    "d2s8ui": 12_378_640,
    "d2s8i": 12_378_640,
}


@pytest.mark.parametrize("name", TABLE1_PRESETS)
def test_every_table1_preset_has_its_count(name):
    config = load_preset(name)
    assert n_params(config.model, config.sharing) == TABLE1_COUNTS[name]


@pytest.mark.parametrize("width, expected", [(512, 1408), (1024, 2816), (256, 704), (128, 352)])
def test_d_ff_auto(width, expected):
    assert resolved_d_ff(ModelConfig(width=width)) == expected
    assert resolved_d_ff(ModelConfig(width=width, d_ff=100)) == 100  # an explicit value wins


@pytest.mark.parametrize(
    "model_kw",
    [
        {},
        {"width": 1024},
        {"num_classes": 0, "head_dim": 32},
        {"d_ff": 100, "mapping_layers": 0},
        {"channels": 1, "patch_size": 2},
    ],
)
@pytest.mark.parametrize(
    "sharing",
    [
        SharingConfig(),
        SharingConfig(depth=3, substeps=4),
        SharingConfig(depth=2, substeps=5, repeat_conditioning="scale+embedding"),
    ],
)
def test_parameter_count_is_the_built_count(model_kw, sharing):
    """The closed form that vets a size before anything is built, against the built model."""
    model = ModelConfig(**model_kw)
    net = build_model(model, sharing, "meta")
    assert parameter_count(model, sharing) == sum(p.numel() for p in net.parameters())
    assert buffer_count(model) == sum(b.numel() for b in net.buffers())


# ------------------------------------------------------------------------------------------------
# Sizes that cannot fit: refused in one line with the estimate, before anything is allocated

HUGE = ModelConfig(width=1073741824)  # 1.5e20 parameters


def size_error(call, *args) -> str:
    with pytest.raises(UserError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_memory_bytes_of_the_host():
    assert hardware.memory_bytes(torch.device("cpu")) > 2**28  # sysconf's physical memory
    assert hardware.memory_bytes(torch.device("meta")) is None


def test_build_refuses_a_model_larger_than_the_machine():
    message = size_error(build_model, HUGE, SharingConfig(), "cpu")
    assert message.startswith(
        "model.width = 1073741824 (sharing.depth = 8): the model would have 1.53e+20 "
        "parameters (5.69e+11 GiB in float32); this machine has "
    )


def test_meta_refuses_what_pytorch_cannot_describe():
    """`tdiff params` counts on "meta"; a size beyond PyTorch's tensor limit would overflow there."""
    assert "more than PyTorch can address" in size_error(build_model, HUGE, SharingConfig(), "meta")
    long = ModelConfig(image_size=32768, patch_size=1)  # a forward's attention: 8 heads x (2^30 tokens)^2
    assert size_error(build_model, long, SharingConfig(), "meta").startswith("model.image_size = 32768")


def test_the_limit_is_the_device_memory(monkeypatch):
    model, sharing = configs(width=128, head_dim=64)
    float32_bytes = 4 * (parameter_count(model, sharing) + buffer_count(model))
    monkeypatch.setattr(hardware, "memory_bytes", lambda device: float32_bytes - 1)
    assert "this machine has 0.00" in size_error(build_model, model, sharing, "cpu")
    monkeypatch.setattr(hardware, "memory_bytes", lambda device: float32_bytes)
    assert build_model(model, sharing, "cpu") is not None


def test_training_needs_twenty_bytes_per_weight_and_refuses_before_building(monkeypatch):
    from accelerate import Accelerator

    from tdiff import step

    config = apply_overrides(load_preset("tiny"), ["train.batch_size=2"])
    weights = parameter_count(config.model, config.sharing) + buffer_count(config.model)
    monkeypatch.setattr(hardware, "memory_bytes", lambda device: 10 * weights)  # inference fits, training not
    monkeypatch.setattr(step, "ImageTransformer", None)  # building anything would fail loudly
    build_model(config.model, config.sharing, "cpu")
    message = size_error(step.Trainer, config, Accelerator(cpu=True), 0)
    assert message.startswith("model.width = 64 (sharing.depth = 2)") and "to train" in message


def cli_error(capsys, *args) -> str:
    """The one stderr line of `tdiff ARGS`, which must exit 2 (bad input) and print nothing else."""
    from tdiff.cli import main

    assert main(list(args)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    return err


def test_params_refuses_a_huge_width(capsys):
    err = cli_error(capsys, "params", "--set", "model.width=1073741824")
    assert err.startswith("error: model.width = 1073741824 (sharing.depth = 8): the model would have 1.53e+20 ")


def test_train_refuses_a_huge_width_before_building(capsys, tmp_path, monkeypatch):
    from tdiff import step

    data = tmp_path / "data.npz"
    np.savez(data, images=np.zeros((10, 32, 32, 3), np.uint8), labels=np.arange(10))
    monkeypatch.setattr(step, "ImageTransformer", None)  # building anything would fail loudly
    err = cli_error(
        capsys,
        "train",
        "--preset",
        "tiny",
        "--data",
        str(data),
        "--cpu",
        "--num-workers",
        "0",
        "--out",
        str(tmp_path / "run"),
        "--set",
        "model.width=1073741824",
    )
    assert err.startswith("error: model.width = 1073741824 (sharing.depth = 2)") and "to train" in err


# ------------------------------------------------------------------------------------------------
# Optimiser groups (spec §1.8)


def test_param_groups_d2_width_512():
    net = build_model(ModelConfig(width=512), SharingConfig(depth=2, substeps=8), "meta")
    groups = {g["name"]: g for g in param_groups(net, lr=5e-4, weight_decay=1e-4, mapping_lr_scale=1 / 3)}
    sizes = {name: sum(p.numel() for p in g["params"]) for name, g in groups.items()}
    assert sizes == {"decay": 6_422_528, "no_decay": 580_112, "decay_mapping": 5_373_952, "no_decay_mapping": 2_048}
    settings = {name: (g["lr"], g["weight_decay"]) for name, g in groups.items()}
    assert settings["decay"] == (5e-4, 1e-4)
    assert settings["no_decay"] == (5e-4, 0.0)
    assert settings["decay_mapping"] == (pytest.approx(5e-4 / 3), 1e-4)
    assert settings["no_decay_mapping"] == (pytest.approx(5e-4 / 3), 0.0)
    # Every parameter in exactly one group.
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in net.parameters())


# ------------------------------------------------------------------------------------------------
# Forward cost (spec §3.4)


@pytest.mark.parametrize("preset, gflops, attention", [("d2s4i", 3.31, 0.067), ("d2s8i", 6.61, 0.134)])
def test_forward_gflops_width_512(preset, gflops, attention):
    summary = model_summary(load_preset(preset))
    assert summary["gflops_per_image"] == pytest.approx(gflops, rel=0.02)
    assert summary["gflops_attention_per_image"] == pytest.approx(attention, rel=0.02)


def test_gflops_depend_on_effective_depth_not_on_sharing():
    d8, d1s8 = (model_summary(load_preset(n)) for n in ("d8", "d1s8"))
    assert d8["gflops_per_image"] == d1s8["gflops_per_image"]
    assert d8["params_total"] == 34_793_536 and d1s8["params_total"] == 8_642_824  # ... not compute


# ------------------------------------------------------------------------------------------------
# Forward semantics: initialisation, sharing, repeat conditioning


def test_fresh_model_outputs_exactly_zero():
    net = small_net(perturb=False, depth=2, substeps=3)
    x, c_noise, labels = inputs(net)
    out = net(x, c_noise, class_cond=labels)
    assert out.shape == (2, 3, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))


def test_substeps_1_equals_a_plain_stack_of_the_same_blocks():
    net = small_net(depth=3, substeps=1)
    x, c_noise, labels = inputs(net)
    expected = manual_forward(net, x, c_noise, labels, [(0, 1), (1, 1), (2, 1)])
    assert expected.abs().max() > 1e-3  # the comparison is not between zeros
    torch.testing.assert_close(net(x, c_noise, class_cond=labels), expected, rtol=1e-12, atol=1e-12)


# spec §2.4, depth 2, substeps 3: (block, conditioning multiplier) per application.
INTERLEAVED_2x3 = [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)]
NON_INTERLEAVED_2x3 = [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]


@pytest.mark.parametrize("interleaved, applications", [(True, INTERLEAVED_2x3), (False, NON_INTERLEAVED_2x3)])
def test_forward_equals_manual_loop_with_scaled_conditioning(interleaved, applications):
    net = small_net(depth=2, substeps=3, interleaved=interleaved)
    x, c_noise, labels = inputs(net)
    expected = manual_forward(net, x, c_noise, labels, applications)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(net(x, c_noise, class_cond=labels), expected, rtol=1e-12, atol=1e-12)
    # The multiplier matters: all-ones conditioning gives something else.
    unscaled = manual_forward(net, x, c_noise, labels, [(b, 1) for b, _ in applications])
    assert not torch.allclose(unscaled, expected)


def test_interleaved_and_non_interleaved_differ():
    a = small_net(depth=2, substeps=2, interleaved=True)
    b = small_net(perturb=False, depth=2, substeps=2, interleaved=False)
    b.load_state_dict(a.state_dict())
    x, c_noise, labels = inputs(a)
    assert not torch.allclose(a(x, c_noise, class_cond=labels), b(x, c_noise, class_cond=labels))


def test_every_application_of_a_shared_block_contributes_gradient():
    """The shared weights' gradient is the sum of one gradient per application (none dropped)."""
    net = small_net(depth=2, substeps=3, interleaved=True)
    x, c_noise, labels = inputs(net)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)

    (net(x, c_noise, class_cond=labels) * target).sum().backward()
    shared = [{k: p.grad.clone() for k, p in block.named_parameters()} for block in net.blocks]

    # Unrolled: each application gets its own leaf copy of its block's weights.
    copies = [
        {k: p.detach().clone().requires_grad_() for k, p in net.blocks[b].named_parameters()}
        for b, _ in INTERLEAVED_2x3
    ]

    def call(i, b, tokens, cond):
        return functional_call(net.blocks[b], copies[i], (tokens, net.pos, cond))

    net.zero_grad()
    (manual_forward(net, x, c_noise, labels, INTERLEAVED_2x3, call) * target).sum().backward()
    for b in range(2):
        per_application = [copies[i] for i, (block, _) in enumerate(INTERLEAVED_2x3) if block == b]
        assert len(per_application) == 3
        for name, grad in shared[b].items():
            for copy in per_application:
                assert copy[name].grad.abs().sum() > 0, (b, name)
            torch.testing.assert_close(sum(c[name].grad for c in per_application), grad, rtol=1e-9, atol=1e-12)


def test_mapping_network_runs_once_per_forward():
    net = small_net(depth=2, substeps=4)
    calls = []
    net.mapping.register_forward_hook(lambda *_: calls.append(1))
    x, c_noise, labels = inputs(net)
    net(x, c_noise, class_cond=labels)
    assert len(calls) == 1


def test_class_cond_is_required_on_a_conditional_model():
    net = small_net(depth=1)
    x, c_noise, _ = inputs(net)
    with pytest.raises(ValueError, match="class_cond"):
        net(x, c_noise)
    unconditional = small_net(depth=1, num_classes=0)
    assert unconditional(x, c_noise).shape == x.shape


def test_scale_plus_embedding_starts_as_the_reference():
    reference = small_net(depth=2, substeps=3)
    extended = small_net(perturb=False, depth=2, substeps=3, repeat_conditioning="scale+embedding")
    missing, unexpected = extended.load_state_dict(reference.state_dict(), strict=False)
    assert missing == ["repeat_emb"] and unexpected == []
    x, c_noise, labels = inputs(reference)
    torch.testing.assert_close(
        extended(x, c_noise, class_cond=labels), reference(x, c_noise, class_cond=labels), rtol=0, atol=0
    )
    # ... and the embedding is live once it is non-zero.
    with torch.no_grad():
        extended.repeat_emb.normal_()
    assert not torch.allclose(extended(x, c_noise, class_cond=labels), reference(x, c_noise, class_cond=labels))


def test_scale_plus_embedding_adds_substeps_times_width_at_mapping_rate_without_decay():
    width, substeps = 512, 8
    base = build_model(*configs(width=width, head_dim=64, substeps=substeps), "meta")
    extended = build_model(
        *configs(width=width, head_dim=64, substeps=substeps, repeat_conditioning="scale+embedding"), "meta"
    )
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(extended) - count(base) == substeps * width
    groups = param_groups(extended, lr=5e-4, weight_decay=1e-4, mapping_lr_scale=1 / 3)
    (home,) = [g for g in groups if any(p is extended.repeat_emb for p in g["params"])]
    assert home["name"] == "no_decay_mapping"
    assert home["lr"] == pytest.approx(5e-4 / 3) and home["weight_decay"] == 0.0


def test_gradient_checkpointing_changes_nothing_but_memory():
    plain = small_net(depth=2, substeps=2).train()
    ckpt = small_net(perturb=False, depth=2, substeps=2, checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    for block in ckpt.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))  # recompute may stop early
    x, c_noise, labels = inputs(plain)
    out_plain, out_ckpt = plain(x, c_noise, class_cond=labels), ckpt(x, c_noise, class_cond=labels)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    out_plain.square().sum().backward()
    out_ckpt.square().sum().backward()
    assert len(calls) == 2 * 4  # every application ran again in backward: checkpointing was on
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------------------------
# Patching (spec §1.2)


def test_patching_feature_order_and_unpatching():
    net = small_net(depth=1)
    n, c, size, p = 2, 3, 16, 4
    grid = size // p
    x = torch.arange(n * c * size * size, dtype=torch.float64).reshape(n, c, size, size)
    seen = {}
    net.in_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("tokens", args[0]))
    known = torch.arange(n * grid * grid * c * p * p, dtype=torch.float64).reshape(n, grid * grid, -1)
    net.out_proj.register_forward_hook(lambda m, args, out: known)
    out = net(x, torch.zeros(n, dtype=torch.float64), class_cond=torch.zeros(n, dtype=torch.long))
    tokens = seen["tokens"]
    assert tokens.shape == (n, grid * grid, c * p * p)
    for gy in range(grid):
        for gx in range(grid):
            for ch in range(c):
                for i in range(p):
                    for j in range(p):
                        token, feature = gy * grid + gx, ch * p * p + i * p + j
                        pixel = (slice(None), ch, gy * p + i, gx * p + j)
                        assert torch.equal(tokens[:, token, feature], x[pixel])
                        assert torch.equal(out[pixel], known[:, token, feature])


# ------------------------------------------------------------------------------------------------
# Axial RoPE (spec §1.5 step 4)


def test_positions_are_cell_centres_with_y_first():
    pos = patch_positions(8, 8)
    centres = torch.linspace(-0.875, 0.875, 8)
    assert pos.shape == (64, 2)
    torch.testing.assert_close(pos[:8, 0], torch.full([8], -0.875))  # first row: y fixed ...
    torch.testing.assert_close(pos[:8, 1], centres)  # ... x runs along it
    torch.testing.assert_close(pos[::8, 0], centres)
    net = build_model(ModelConfig(width=64, head_dim=32), SharingConfig(depth=1))
    torch.testing.assert_close(net.pos, pos)


def random_rope(seed=0, n_heads=2, head_dim=32):
    torch.manual_seed(seed)
    rope = AxialRoPE(n_heads, head_dim).double()
    with torch.no_grad():  # per-head, per-pair frequencies that differ from the init grid
        rope.freqs_h.add_(torch.randn_like(rope.freqs_h) * 0.3)
        rope.freqs_w.add_(torch.randn_like(rope.freqs_w) * 0.3)
    return rope


def rotate(rope, x, positions):
    pos = torch.tensor(positions, dtype=torch.float64)
    return rope(x, rope.angles(pos))


def test_rope_preserves_norms():
    rope = random_rope()
    x = torch.randn(3, 2, 5, 32, dtype=torch.float64)
    y = rotate(rope, x, [[0.1, -0.3], [0.9, 0.2], [-0.7, -0.7], [0.0, 0.0], [0.3, 0.8]])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(
        y.unflatten(-1, (-1, 2)).norm(dim=-1),  # each adjacent pair, too
        x.unflatten(-1, (-1, 2)).norm(dim=-1),
    )


def test_rope_score_depends_only_on_position_difference():
    rope = random_rope()
    q, k = torch.randn(2, 1, 2, 1, 32, dtype=torch.float64)

    def score(pq, pk):
        return (rotate(rope, q, [pq]) * rotate(rope, k, [pk])).sum(-1)  # one logit per head

    base = score([0.1, -0.4], [0.6, 0.3])
    torch.testing.assert_close(score([0.1 + 0.5, -0.4 - 0.2], [0.6 + 0.5, 0.3 - 0.2]), base)
    torch.testing.assert_close(score([-1.0, 2.0], [-0.5, 2.7]), base)
    # Both axes are used: changing either difference changes the logit.
    assert not torch.allclose(score([0.1, -0.4], [0.9, 0.3]), base)
    assert not torch.allclose(score([0.1, -0.4], [0.6, 0.0]), base)


def test_rope_y_rotates_the_first_half_and_x_the_second():
    rope = random_rope()
    x = torch.randn(1, 2, 1, 32, dtype=torch.float64)
    moved_y, moved_x = rotate(rope, x, [[0.7, 0.0]]), rotate(rope, x, [[0.0, 0.7]])
    assert torch.equal(moved_y[..., 16:], x[..., 16:]) and not torch.allclose(moved_y[..., :16], x[..., :16])
    assert torch.equal(moved_x[..., :16], x[..., :16]) and not torch.allclose(moved_x[..., 16:], x[..., 16:])


# ------------------------------------------------------------------------------------------------
# QK-norm (spec §1.5 step 3)


def test_qk_norm_logit_is_temperature_times_cosine():
    head_dim = 32
    qk = QKNorm(n_heads=2, head_dim=head_dim).double()
    with torch.no_grad():
        qk.log_scale.copy_(torch.tensor([math.log(3.0), math.log(20.0)]))
    q, k = torch.randn(2, 1, 2, 6, head_dim, dtype=torch.float64)
    logits = qk(q) @ qk(k).transpose(-1, -2) / math.sqrt(head_dim)  # SDPA's default scale
    cosine = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-1, -2)
    expected = torch.tensor([3.0, 20.0], dtype=torch.float64)[:, None, None] * cosine
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_qk_norm_temperature_starts_at_10_and_is_capped_at_100_in_training():
    attn = SelfAttention(width=64, head_dim=32, dropout=0.0)
    torch.testing.assert_close(attn.qk_norm.log_scale, torch.full([2], math.log(10.0)))
    config = load_preset("tiny")
    net = build_model(config.model, SharingConfig(depth=2, substeps=2))
    heads = net.blocks[1].attn.qk_norm.log_scale
    with torch.no_grad():
        heads.copy_(torch.tensor([10.0, 1.0]).repeat(len(heads) // 2))
    x = torch.randn(1, config.model.channels, config.model.image_size, config.model.image_size)
    labels = torch.zeros(1, dtype=torch.long)
    net.eval()(x, torch.zeros(1), class_cond=labels)
    assert heads[0] == 10.0  # sampling leaves the weights alone
    # Once per training forward, before the blocks run (so compiled blocks mutate no parameter)
    net.train()(x, torch.zeros(1), class_cond=labels)
    torch.testing.assert_close(heads, torch.tensor([math.log(100.0), 1.0]).repeat(len(heads) // 2))
