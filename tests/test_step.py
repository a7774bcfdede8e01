"""`tdiff.step.Trainer`: the optimiser step that `train`, the benchmarks and `compare --measure` share.

What is pinned here: the step never reads a value back from the device nor starts a collective
(the loop decides when to `read`); a non-finite loss is found by `read`, naming its step; the
optimiser kernels are the multi-tensor ones; regional compilation compiles each distinct block once
and keeps the outputs; bf16 on a CPU without bf16 instructions is called out in one line.
"""

from __future__ import annotations

import sys

import pytest
import torch
from accelerate import Accelerator

from tdiff import hardware
from tdiff.config import apply_overrides, load_preset
from tdiff.diffusion import drop_labels
from tdiff.model import ImageTransformer
from tdiff.step import Trainer, step_noise, synthetic_micro_batch

TINY = ["model.image_size=16", "train.batch_size=4", "sharing.depth=2", "sharing.substeps=4"]


@pytest.fixture
def accelerator():
    return Accelerator(cpu=True)


def tiny(*overrides: str):
    return apply_overrides(load_preset("tiny"), [*TINY, *overrides])


def test_the_step_reads_nothing_back_from_the_device_and_starts_no_collective(accelerator, monkeypatch):
    trainer = Trainer(tiny(), accelerator, seed=0)
    batch = synthetic_micro_batch(trainer.config, trainer.device)
    trainer.step(0, [batch])  # first step: lazy initialisation may look at values
    reads = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("tdiff"):  # torch's own CPU bookkeeping (AdamW's step count) is fine
                reads.append(f"{name} in {caller}")
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    for name in ("reduce", "gather", "wait_for_everyone"):
        monkeypatch.setattr(accelerator, name, lambda *a, name=name, **k: reads.append(f"accelerator.{name}"))
    for step in range(1, 4):
        trainer.step(step, [batch])
    monkeypatch.undo()
    assert reads == []
    report = trainer.read()
    assert report.first_bad_step is None and torch.isfinite(torch.tensor(report.loss))


def test_a_non_finite_loss_is_found_by_read_and_names_its_step(accelerator):
    trainer = Trainer(tiny(), accelerator, seed=0)
    images, aug_cond, labels = synthetic_micro_batch(trainer.config, trainer.device)
    trainer.step(0, [(images, aug_cond, labels)])
    assert trainer.read().first_bad_step is None
    trainer.step(1, [(images * float("nan"), aug_cond, labels)])
    trainer.step(2, [(images, aug_cond, labels)])
    assert trainer.read().first_bad_step == 2  # 1-based: the second step


def test_the_optimiser_is_fused_adamw_over_the_four_groups(accelerator):
    trainer = Trainer(tiny(), accelerator, seed=0)
    defaults = trainer.optimizer.optimizer.defaults
    assert defaults["fused"] is True  # torch's fused kernel on the CPU (and CUDA)
    assert sorted(g["name"] for g in trainer.optimizer.param_groups) == [
        "decay",
        "decay_mapping",
        "no_decay",
        "no_decay_mapping",
    ]


def test_label_dropout_is_drop_labels_on_the_steps_own_draws(accelerator, monkeypatch):
    import tdiff.step

    config = tiny("train.grad_accum=2", "diffusion.cond_dropout=0.5")
    trainer = Trainer(config, accelerator, seed=0)
    calls = []

    def spy(labels, rate, null_class, generator=None, *, uniform=None):
        calls.append((rate, null_class, generator, uniform))
        return drop_labels(labels, rate, null_class, generator, uniform=uniform)

    monkeypatch.setattr(tdiff.step, "drop_labels", spy)
    batch = synthetic_micro_batch(trainer.config, trainer.device)
    trainer.step(5, [batch, batch])
    draws = step_noise(0, 5, trainer.global_batch, trainer.shape, trainer.device)
    assert [(rate, null, gen) for rate, null, gen, _ in calls] == [(0.5, 10, None)] * 2
    for micro, (*_, uniform) in enumerate(calls):
        assert torch.equal(uniform, draws.group(micro, 2)[2])  # one process: group = micro-step


def test_the_first_step_leaves_the_ema_equal_to_the_weights(accelerator):
    trainer = Trainer(tiny(), accelerator, seed=0)
    trainer.step(0, [synthetic_micro_batch(trainer.config, trainer.device)])
    for (name, p), e in zip(trainer.net.named_parameters(), trainer.ema_net.parameters()):
        assert torch.equal(p, e), name  # EMA decay 0 at the first update: a bit-exact copy


def count_graphs(monkeypatch) -> list:
    """Compile with a backend that records each graph dynamo hands it and runs it eagerly."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    return graphs, backend


@pytest.mark.parametrize("routed", [False, True])
def test_regional_compilation_compiles_the_block_once_for_all_applications(monkeypatch, routed):
    from tdiff.acceleration import Routing, routes_from_config

    config = tiny("routing.rates=[0.5]", "routing.starts=[1]", "routing.ends=[5]")
    torch.manual_seed(0)
    plain = ImageTransformer(config.model, config.sharing).train()
    with torch.no_grad():
        for p in plain.parameters():  # wake the zero-initialised branches so every block matters
            p.add_(torch.randn_like(p) * 0.02)
    compiled = ImageTransformer(config.model, config.sharing).train()
    compiled.load_state_dict(plain.state_dict())
    graphs, backend = count_graphs(monkeypatch)
    assert compiled.compile_blocks(backend=backend) == 2  # D2S4: two blocks, eight applications

    x, c_noise = torch.randn(3, 3, 16, 16), torch.randn(3)
    labels = torch.tensor([0, 1, 2])
    kwargs = {}
    if routed:
        tokens = (16 // config.model.patch_size) ** 2
        kwargs["routing"] = Routing.draw(
            routes_from_config(config.routing), 3, tokens, torch.Generator().manual_seed(0)
        )
    torch.manual_seed(1)
    expected = plain(x, c_noise, class_cond=labels, **kwargs)
    torch.manual_seed(1)
    got = compiled(x, c_noise, class_cond=labels, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # One graph per distinct block for the full sequence; a route adds one per block for its token count.
    # Blocks of one architecture share their code, and dynamo passes the weights in as inputs: one graph
    # serves every distinct block and every application. A route adds one for its shorter sequence.
    assert len(graphs) == (2 if routed else 1)


def test_bf16_on_a_cpu_without_bf16_instructions_is_called_out(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    line = hardware.slow_precision_warning(torch.device("cpu"), "bf16")
    assert "no native bf16" in line and "\n" not in line
    assert hardware.slow_precision_warning(torch.device("cpu"), "no") is None
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert hardware.slow_precision_warning(torch.device("cpu"), "bf16") is None


def test_train_prints_the_bf16_warning_before_anything_else(monkeypatch, tmp_path, capsys):
    from accelerate.state import AcceleratorState

    from tdiff.cli import main

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    AcceleratorState._reset_state(True)  # this process's earlier tests initialised accelerate in float32
    code = main(
        [
            "train",
            "--preset",
            "tiny",
            "--cpu",
            "--mixed-precision",
            "bf16",
            "--data",
            str(tmp_path / "missing.npz"),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    AcceleratorState._reset_state(True)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[0].startswith("warning: this CPU has no native bf16") and err[1].startswith("error: --data")


def test_matmul_precision_is_set_by_train_sample_and_eval(monkeypatch, accelerator):
    from tdiff.sample import resolve_device

    torch.backends.cuda.matmul.allow_tf32 = False
    resolve_device("cpu")  # what `tdiff sample` and `tdiff eval` call
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    Trainer(tiny(), accelerator, seed=0)  # what `tdiff train` builds
    assert torch.backends.cuda.matmul.allow_tf32
