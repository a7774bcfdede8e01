"""TREAD token routing (tdiff.acceleration, ImageTransformer.run_routed): exact identities on a
float64 width-64 model, the `[routing]` section, and a routed `tdiff train` that resumes bit-identically."""

import pytest
import torch
from einops import rearrange
from nets import net_inputs, perturbed_net

from tdiff.acceleration import Route, Routing, route_order, routes_from_config
from tdiff.checkpoint import latest_step_dir, load_weights
from tdiff.cli import main
from tdiff.config import apply_overrides, load_preset
from tdiff.diffusion import Denoiser
from tdiff.errors import UserError
from tdiff.sample import SamplingPlan, sample_batch

# ------------------------------------------------------------------------------------------------
# Helpers: a perturbed float64 model (tests/nets.py), in training mode so routing applies


def small_net(depth=2, substeps=2, interleaved=True, seed=0):
    return perturbed_net(depth, substeps, interleaved, seed).train()


def inputs(n=3, seed=0):
    return net_inputs(n, seed)


def routing(routes, n=3, tokens=16, seed=0):
    return Routing.draw(tuple(routes), n, tokens, torch.Generator().manual_seed(seed))


def record_block_io(net):
    """Every block call's (input, output) in application order, through forward hooks."""
    calls = []
    for block in net.blocks:
        block.register_forward_hook(lambda module, args, out: calls.append((args[0], args[1], out)))
    return calls


# ------------------------------------------------------------------------------------------------
# The routed forward pass


def test_rate_zero_is_exactly_the_plain_model():
    net = small_net()
    x, c_noise, labels = inputs()
    plain = net(x, c_noise, class_cond=labels)
    routed = net(x, c_noise, class_cond=labels, routing=routing([Route(1, 2, 0.0)]))
    assert torch.equal(routed, plain)


def test_routed_tokens_reenter_unchanged_and_kept_ones_see_their_own_positions():
    net = small_net()  # order 1212: applications 0..3; route 1..2 covers a repeat of each block
    x, c_noise, labels = inputs()
    r = routing([Route(1, 2, 0.5)])
    calls = record_block_io(net)
    net(x, c_noise, class_cond=labels, routing=r)
    assert [c[0].shape[1] for c in calls] == [16, 8, 8, 16]  # L' = 16 − int(16·0.5)
    keep = r.keep_index(0, 16)  # (N, 8)
    route_input, route_output, after = calls[0][2], calls[2][2], calls[3][0]
    for n in range(3):
        bypass = torch.tensor([t for t in range(16) if t not in keep[n]])
        # the 8 routed tokens enter application 3 exactly as they left application 0 ...
        assert torch.equal(after[n, bypass], route_input[n, bypass])
        # ... the kept ones as the route computed them, in image order
        assert torch.equal(after[n, keep[n]], route_output[n])
        # inside the route a kept token carries its own (y, x), per sample
        assert torch.equal(calls[1][1][n], net.pos[keep[n]])
    assert not torch.equal(keep[0], keep[1])  # a fresh choice per sample


def test_route_equals_running_the_blocks_on_the_kept_tokens_alone():
    net = small_net(depth=3, substeps=2, interleaved=False)  # order 112233, route 2..4 spans blocks 2, 3
    x, c_noise, labels = inputs()
    r = routing([Route(2, 4, 0.25)])
    routed = net(x, c_noise, class_cond=labels, routing=r)
    conds = net.repeat_conditions(net.condition(c_noise, None, labels))
    tokens = net.in_proj(rearrange(x, "n c (h i) (w j) -> n (h w) (c i j)", i=4, j=4))  # (3, 16, 64)
    tokens = net.run_applications(tokens, net.pos, conds, 0, 2)
    for n in range(3):
        keep = r.keep_index(0, 16)[n]  # 12 tokens, unbatched positions (12, 2)
        one = [c[n : n + 1] for c in conds]
        full = tokens[n : n + 1].clone()
        full[:, keep] = net.run_applications(tokens[n : n + 1, keep], net.pos[keep], one, 2, 5)
        out = net.out_proj(net.out_norm(net.run_applications(full, net.pos, one, 5, 6)))
        expected = rearrange(out, "n (h w) (c i j) -> n c (h i) (w j)", h=4, i=4, j=4)
        torch.testing.assert_close(routed[n : n + 1], expected, rtol=1e-12, atol=1e-12)


def test_two_routes_in_one_pass():
    net = small_net(depth=2, substeps=3)  # 6 applications: routes 1..2 and 3..4
    x, c_noise, labels = inputs()
    calls = record_block_io(net)
    net(x, c_noise, class_cond=labels, routing=routing([Route(1, 2, 0.5), Route(3, 4, 0.75)]))
    assert [c[0].shape[1] for c in calls] == [16, 8, 8, 4, 4, 16]


def test_rope_angles_take_per_sample_positions():
    rope = small_net().blocks[0].attn.rope
    pos = torch.rand(3, 5, 2, dtype=torch.float64) * 2 - 1
    batched = rope.angles(pos)  # (N, n_h, L', d_h/2)
    assert batched.shape == (3, 2, 5, 16)
    for n in range(3):
        assert torch.equal(batched[n], rope.angles(pos[n]))


def test_gradients_flow_through_a_route():
    net = small_net()
    x, c_noise, labels = inputs()
    x.requires_grad_(True)
    net(x, c_noise, class_cond=labels, routing=routing([Route(1, 2, 0.5)])).pow(2).sum().backward()
    for name, p in net.named_parameters():
        if name.startswith(("blocks.", "in_proj", "out_proj")):
            assert p.grad is not None and p.grad.abs().sum() > 0 and p.grad.isfinite().all(), name
    assert x.grad.abs().flatten(1).sum(1).gt(0).all()


def test_evaluation_and_sampling_never_route():
    net = small_net().eval()
    x, c_noise, labels = inputs()
    r = routing([Route(0, 3, 0.5)])
    assert torch.equal(net(x, c_noise, class_cond=labels, routing=r), net(x, c_noise, class_cond=labels))
    denoiser = Denoiser(net.float()).eval()  # the samplers run in float32
    plan = SamplingPlan("dpmpp_2m", 3, 0.01, 80.0, 7.0, 1.0, {})
    args = (denoiser, plan, [0, 1, 2], labels, (3, 16, 16), 10, torch.device("cpu"))
    calls = record_block_io(net)
    assert torch.equal(sample_batch(*args, routing=r), sample_batch(*args))
    assert {c[0].shape[1] for c in calls} == {16}


def test_route_order_is_a_permutation_drawn_from_the_generator():
    a = route_order(4, 2, 16, torch.Generator().manual_seed(3))
    b = route_order(4, 2, 16, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4, 2, 16)
    assert torch.equal(a.sort(-1).values, torch.arange(16).expand(4, 2, 16))
    assert not torch.equal(a, route_order(4, 2, 16, torch.Generator().manual_seed(4)))


# ------------------------------------------------------------------------------------------------
# The [routing] section


def test_tread_presets_follow_the_absolute_placement_rule():
    for name in ("d2s8i-tread", "d16-tread"):
        c = load_preset(name)
        applications = c.sharing.depth * c.sharing.substeps
        assert routes_from_config(c.routing) == (Route(2, applications - 4, 0.5),)
        plain = load_preset(name.removesuffix("-tread"))
        assert c.model == plain.model and c.sharing == plain.sharing and c.train == plain.train


@pytest.mark.parametrize(
    "items, message",
    [
        (["routing.rates=[0.5]"], "one entry per route"),
        (["routing.rates=[1.0]", "routing.starts=[1]", "routing.ends=[2]"], "in [0, 1)"),
        (["routing.rates=[0.5]", "routing.starts=[3]", "routing.ends=[2]"], "start <= end <= 15"),
        (["routing.rates=[0.5]", "routing.starts=[2]", "routing.ends=[16]"], "start <= end <= 15"),
        (["routing.rates=[0.5]", "routing.starts=[-1]", "routing.ends=[2]"], ">= 0"),
        (["routing.rates=[0.5, 0.5]", "routing.starts=[2, 6]", "routing.ends=[6, 9]"], "overlap"),
        (["routing.rates=0.5"], "must be a list of numbers"),
    ],
)
def test_bad_routes_are_one_line_errors(items, message):
    with pytest.raises(UserError) as info:
        apply_overrides(load_preset("d2s8i"), items)
    assert message in str(info.value) and str(info.value).startswith("routing.")


def test_routes_may_touch_and_come_in_any_order():
    c = apply_overrides(
        load_preset("d2s8i"), ["routing.rates=[0.25, 0.5]", "routing.starts=[7, 2]", "routing.ends=[12, 6]"]
    )
    assert routes_from_config(c.routing) == (Route(2, 6, 0.5), Route(7, 12, 0.25))


# ------------------------------------------------------------------------------------------------
# Through `tdiff train`: routed steps, and a resume that continues bit-identically


ROUTED = [
    "--set",
    "model.image_size=16",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.demo_every=0",
    "--set",
    "train.log_every=1",
    "--set",
    "routing.rates=[0.5]",
    "--set",
    "routing.starts=[1]",
    "--set",
    "routing.ends=[2]",
]


def train(run_dir, data, steps, *extra):
    """`tdiff train` in-process; `--resume` continues with the run's own configuration."""
    preset = [] if "--resume" in extra else ["--preset", "tiny"]
    argv = [
        "train",
        *preset,
        "--data",
        str(data),
        "--out",
        str(run_dir),
        "--steps",
        str(steps),
        "--cpu",
        "--num-workers",
        "0",
        "--json",
        *extra,
    ]
    assert main(argv) == 0


def weights(run_dir):
    step_dir = latest_step_dir(run_dir)
    return {kind: load_weights(step_dir / f"{kind}.safetensors").tensors for kind in ("model", "ema")}


def test_routed_training_resumes_bit_identically(tiny_data, tmp_path, capsys):
    train(tmp_path / "once", tiny_data, 4, *ROUTED)
    train(tmp_path / "twice", tiny_data, 2, *ROUTED)
    train(tmp_path / "twice", tiny_data, 4, "--resume")
    capsys.readouterr()
    once, twice = weights(tmp_path / "once"), weights(tmp_path / "twice")
    for kind in once:
        assert once[kind].keys() == twice[kind].keys()
        for key in once[kind]:
            assert torch.equal(once[kind][key], twice[kind][key]), (kind, key)
    # the route really ran: the same run without routes ends elsewhere
    train(tmp_path / "plain", tiny_data, 4, *ROUTED[:8])
    plain = weights(tmp_path / "plain")["model"]
    assert not all(torch.equal(plain[k], once["model"][k]) for k in plain)
    saved = load_weights(latest_step_dir(tmp_path / "once") / "model.safetensors").config
    assert saved.routing.rates == (0.5,) and saved.routing.starts == (1,)
