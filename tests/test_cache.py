"""Δ-DiT block caching (tdiff.acceleration.CachePlan/BlockCache, ImageTransformer.run_cached):
the delta arithmetic, the stage-adaptive plan, the skipped-application count, and sampling through it."""

import pytest
import torch
from einops import rearrange
from nets import net_inputs, perturbed_net

from tdiff.acceleration import BlockCache, CachePlan
from tdiff.diffusion import Denoiser
from tdiff.sample import SamplingPlan, sample_batch

CPU = torch.device("cpu")


def small_net(depth=2, substeps=2, seed=0, dtype=torch.float64):
    return perturbed_net(depth, substeps, seed=seed, dtype=dtype).eval()


def inputs(n=2, seed=0):
    return net_inputs(n, seed)


def sample(net, steps=7, sampler="dpmpp_2m", cfg_scale=1.0, seeds=(0, 1, 2), **net_kwargs):
    plan = SamplingPlan(sampler, steps, 0.01, 80.0, 7.0, cfg_scale, {})
    labels = torch.arange(len(seeds)) % 10
    return sample_batch(Denoiser(net), plan, list(seeds), labels, (3, 16, 16), 10, CPU, **net_kwargs)


# ------------------------------------------------------------------------------------------------
# The delta arithmetic in one forward pass


def test_a_cached_evaluation_adds_the_stored_delta_to_its_current_input():
    net = small_net()  # 4 applications; span 2 before the boundary = the rear applications 2, 3
    x, c_noise, labels = inputs()
    cache = BlockCache(CachePlan(span=2, boundary=100, interval=2))
    full = net(x, c_noise, class_cond=labels, block_cache=cache)  # evaluation 0: full, stores the delta
    torch.testing.assert_close(full, net(x, c_noise, class_cond=labels), rtol=0, atol=0)
    # Evaluation 1 on the same input: front + stored delta reproduces the full output (up to rounding).
    again = net(x, c_noise, class_cond=labels, block_cache=cache)
    torch.testing.assert_close(again, full, rtol=1e-12, atol=1e-12)
    # Evaluation 3 (cached again) on a new input: its own front, the delta of evaluation 2.
    x2 = x + 0.1 * torch.randn_like(x)
    net(x, c_noise, class_cond=labels, block_cache=cache)
    cached = net(x2, c_noise, class_cond=labels, block_cache=cache)
    conds = net.repeat_conditions(net.condition(c_noise, None, labels))
    patches = "n c (h i) (w j) -> n (h w) (c i j)"

    def front(image):
        return net.run_applications(net.in_proj(rearrange(image, patches, i=4, j=4)), net.pos, conds, 0, 2)

    delta = net.run_applications(front(x), net.pos, conds, 2, 4) - front(x)
    out = net.out_proj(net.out_norm(front(x2) + delta))
    expected = rearrange(out, "n (h w) (c i j) -> n c (h i) (w j)", h=4, i=4, j=4)
    torch.testing.assert_close(cached, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(cached, net(x2, c_noise, class_cond=labels))  # an approximation


def test_rear_span_early_front_span_late():
    net = small_net(depth=4, substeps=1)  # D4: block b is application b
    calls = [0, 0, 0, 0]
    for b, block in enumerate(net.blocks):
        block.register_forward_hook(lambda *args, b=b: calls.__setitem__(b, calls[b] + 1))
    cache = BlockCache(CachePlan(span=1, boundary=3, interval=2))
    sample(net.float(), steps=7, block_cache=cache)
    # evaluations 0 1 2 | 3 4 5 6: rear skipped at 1; front skipped at 4 and 6 (each stage starts full)
    assert calls == [5, 7, 7, 6]
    assert cache.report()["applications_skipped"] == 3


# ------------------------------------------------------------------------------------------------
# Sampling through the cache


def test_interval_one_gives_exactly_the_uncached_samples():
    net = small_net(dtype=torch.float32)
    cache = BlockCache(CachePlan(span=3, boundary=3, interval=1))
    assert torch.equal(sample(net, block_cache=cache), sample(net))
    assert cache.applications_skipped == 0 and cache.evaluations == 7


@pytest.mark.parametrize("sampler, evaluations", [("dpmpp_2m", 7), ("heun", 13)])
def test_skipped_applications_match_the_plan(sampler, evaluations):
    net = small_net(dtype=torch.float32)
    plan = CachePlan(span=2, boundary=3, interval=2)
    cache = BlockCache(plan)
    sample(net, sampler=sampler, block_cache=cache)
    sample(net, sampler=sampler, seeds=(5, 6), block_cache=cache)  # a second batch: a new run
    per_run = sum(len(span) for span, reuse in (plan.action(e, 4) for e in range(evaluations)) if reuse)
    assert per_run == {7: 6, 13: 12}[evaluations]  # written out: 0 1 2 | 3 4 5 6: 2 + 2·2
    assert cache.evaluations == 2 * evaluations
    assert cache.applications_skipped == 2 * per_run
    assert cache.applications_run + cache.applications_skipped == 2 * evaluations * 4
    assert cache.skipped_fraction == pytest.approx(per_run / (evaluations * 4))


def test_cached_samples_differ_but_stay_close():
    net = small_net(dtype=torch.float32)
    plain = sample(net, steps=10)
    cached = sample(net, steps=10, block_cache=BlockCache(CachePlan(span=1, boundary=5, interval=2)))
    assert not torch.equal(cached, plain)
    assert (cached - plain).abs().max() < 0.5


def test_guidance_is_one_evaluation_on_the_doubled_batch():
    net = small_net(dtype=torch.float32)
    cache = BlockCache(CachePlan(span=2, boundary=2, interval=2))
    images = sample(net, steps=4, cfg_scale=2.0, block_cache=cache)
    assert images.shape == (3, 3, 16, 16) and cache.evaluations == 4


def test_a_stale_delta_is_refused():
    net = small_net()
    x, c_noise, labels = inputs(n=2)
    cache = BlockCache(CachePlan(span=2, boundary=100, interval=2))
    net(x, c_noise, class_cond=labels, block_cache=cache)
    x3, c3, l3 = inputs(n=3)
    with pytest.raises(RuntimeError, match="new_run"):
        net(x3, c3, class_cond=l3, block_cache=cache)


# ------------------------------------------------------------------------------------------------
# The plan


def test_default_plan():
    assert CachePlan.default(50, 16) == CachePlan(span=4, boundary=30, interval=2)
    assert CachePlan.default(20, 4, interval=3) == CachePlan(span=1, boundary=12, interval=3)


@pytest.mark.parametrize("plan", [CachePlan(0, 3, 2), CachePlan(5, 3, 2), CachePlan(2, -1, 2), CachePlan(2, 3, 0)])
def test_impossible_plans_are_refused(plan):
    with pytest.raises(ValueError):
        plan.check(4)


# ------------------------------------------------------------------------------------------------
# `tdiff sample --cache` / `tdiff eval --cache`


def test_sample_command_caches_and_reports(tiny_run, tmp_path, capsys):
    import json

    import numpy as np

    from tdiff.cli import main

    def sample(name, *extra):
        argv = [
            "sample",
            str(tiny_run),
            "-n",
            "3",
            "--steps",
            "6",
            "--sampler",
            "dpmpp_2m",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / name),
            "--json",
            *extra,
        ]
        assert main(argv) == 0
        summary = json.loads(capsys.readouterr().out)
        return summary["cache"], np.load(tmp_path / name / "samples.npz")["images"]

    none, plain = sample("plain")
    same, cached_1 = sample("interval1", "--cache", "1")
    report, _ = sample("cached", "--cache", "2", "--cache-span", "2", "--cache-boundary", "3")
    assert none is None and np.array_equal(plain, cached_1) and same["applications_skipped"] == 0
    # 6 evaluations, 4 applications: 0 1 2 | 3 4 5 -> reuse at 1 and 4, 2 applications each
    assert (report["evaluations"], report["applications_skipped"], report["span"]) == (6, 4, 2)
    assert main(["sample", str(tiny_run), "--cache-span", "2"]) == 2
    assert main(["sample", str(tiny_run), "--cache", "2", "--cache-span", "5"]) == 2
    assert main(["eval", "--images", str(tmp_path / "plain" / "samples.npz"), "--cache", "2"]) == 2
