"""AdamW's four parameter groups (spec §1.8), formed from the role tags modules give their parameters.

Pinned: the scalar weights of each group for every shipped preset (built on the "meta" device, so no
storage), the groups' learning rates and weight decay, and that the groups follow the tags, not the
module names: a renamed module keeps its group, a parameter nobody tagged is an error, and the tags
survive the EMA's deepcopy and dtype conversions.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from tdiff.config import load_preset, preset_names
from tdiff.model import (
    DECAY,
    MAPPING_RATE,
    NO_DECAY,
    build_model,
    param_groups,
    parameter_count,
    parameter_tags,
    tag,
    tag_module,
)

GROUPS = ("decay", "no_decay", "decay_mapping", "no_decay_mapping")

# Scalar weights per group (decay, no_decay, decay_mapping, no_decay_mapping); a new preset is pinned here.
PINNED = {
    "d16": (51_380_224, 583_808, 12_713_984, 2_048),
    "d16-tread": (51_380_224, 583_808, 12_713_984, 2_048),
    "d1s16": (3_211_264, 579_848, 4_849_664, 2_048),
    "d1s8": (3_211_264, 579_848, 4_849_664, 2_048),
    "d2s4i": (6_422_528, 580_112, 5_373_952, 2_048),
    "d2s4ui": (6_422_528, 580_112, 5_373_952, 2_048),
    "d2s8i": (6_422_528, 580_112, 5_373_952, 2_048),
    "d2s8i-tread": (6_422_528, 580_112, 5_373_952, 2_048),
    "d2s8ui": (6_422_528, 580_112, 5_373_952, 2_048),
    "d8": (25_690_112, 581_696, 8_519_680, 2_048),
    "digits": (200_704, 11_144, 66_560, 192),
    "tiny": (100_352, 15_172, 50_176, 192),
}


def preset_net(name: str, **sharing):
    config = load_preset(name)
    return build_model(config.model, dataclasses.replace(config.sharing, **sharing), "meta"), config


def groups_of(net, config=None):
    t = config.train if config is not None else None
    lr, wd, scale = (t.lr, t.weight_decay, t.mapping_lr_scale) if t else (5e-4, 1e-4, 1 / 3)
    return {g["name"]: g for g in param_groups(net, lr, wd, scale)}


def sizes(groups) -> tuple[int, ...]:
    return tuple(sum(p.numel() for p in groups[name]["params"]) for name in GROUPS)


def members(net, groups) -> dict[str, list[str]]:
    """Parameter names per group, in group order."""
    names = {id(p): n for n, p in net.named_parameters()}
    return {name: [names[id(p)] for p in g["params"]] for name, g in groups.items()}


def test_every_preset_is_pinned():
    assert sorted(PINNED) == preset_names()


@pytest.mark.parametrize("name", sorted(PINNED))
def test_group_sizes_of_every_preset(name):
    net, config = preset_net(name)
    groups = groups_of(net, config)
    assert sorted(groups) == sorted(GROUPS)
    assert sizes(groups) == PINNED[name]
    assert sum(PINNED[name]) == parameter_count(config.model, config.sharing)
    t = config.train
    settings = {n: (g["lr"], g["weight_decay"]) for n, g in groups.items()}
    assert settings == {
        "decay": (t.lr, t.weight_decay),
        "no_decay": (t.lr, 0.0),
        "decay_mapping": (t.lr * t.mapping_lr_scale, t.weight_decay),
        "no_decay_mapping": (t.lr * t.mapping_lr_scale, 0.0),
    }
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == {id(p) for p in net.parameters()}


@pytest.mark.parametrize("name", ["d2s8i", "tiny"])
def test_what_each_group_holds(name):
    """The spec's sentence, parameter by parameter: decay = the Linear weights inside the blocks and the
    mapping network; mapping rate = the mapping network, every adaptive-norm projection, repeat_emb."""
    net, _ = preset_net(name, repeat_conditioning="scale+embedding")
    held = members(net, groups_of(net))
    blocks_linear = {f"blocks.{n}" for n, m in net.blocks.named_modules() if isinstance(m, nn.Linear)}
    mapping_linear = {f"mapping.{n}" for n, m in net.mapping.named_modules() if isinstance(m, nn.Linear)}
    ada = {n for n in blocks_linear if n.endswith("norm.linear")}
    assert ada and mapping_linear
    decayed = {f"{n}.weight" for n in blocks_linear | mapping_linear}
    assert set(held["decay"]) | set(held["decay_mapping"]) == decayed
    mapping_net = {f"mapping.{n}" for n, _ in net.mapping.named_parameters()}
    ada_weights = {f"{n}.weight" for n in ada}
    assert set(held["decay_mapping"]) | set(held["no_decay_mapping"]) == mapping_net | ada_weights | {"repeat_emb"}
    assert "repeat_emb" in held["no_decay_mapping"]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_repeat_embeddings_and_the_class_table_move_only_their_own_weights(name):
    config = load_preset(name)
    w, substeps = config.model.width, config.sharing.substeps
    decay, no_decay, decay_mapping, no_decay_mapping = PINNED[name]
    extended, _ = preset_net(name, repeat_conditioning="scale+embedding")
    assert sizes(groups_of(extended)) == (decay, no_decay, decay_mapping, no_decay_mapping + substeps * w)
    unconditional = build_model(dataclasses.replace(config.model, num_classes=0), config.sharing, "meta")
    classes = (config.model.num_classes + 1) * w
    assert sizes(groups_of(unconditional)) == (decay, no_decay - classes, decay_mapping, no_decay_mapping)


def test_a_parameter_without_a_role_is_an_error():
    net, _ = preset_net("tiny")
    net.extra = nn.Linear(4, 4, bias=False)  # a new layer whose author forgot its role
    with pytest.raises(ValueError, match=r"parameter extra\.weight \(Linear\) has no optimiser role"):
        param_groups(net, 5e-4, 1e-4, 1 / 3)


def test_a_new_layer_inside_the_mapping_network_still_needs_its_own_role():
    """MAPPING_RATE on the whole mapping network is no role: DECAY or NO_DECAY must be given too."""
    net, _ = preset_net("tiny")
    net.mapping.gate = nn.Linear(4, 4, bias=False)
    tag_module(net.mapping, MAPPING_RATE)
    assert parameter_tags(net.mapping.gate, "weight") == {MAPPING_RATE}
    with pytest.raises(ValueError, match=r"mapping\.gate\.weight .* no optimiser role"):
        param_groups(net, 5e-4, 1e-4, 1 / 3)


def test_a_parameter_with_both_decay_tags_is_an_error():
    net, _ = preset_net("tiny")
    tag(net.in_proj, DECAY)  # it already has NO_DECAY
    with pytest.raises(ValueError, match=r"in_proj\.weight .* both DECAY and NO_DECAY"):
        param_groups(net, 5e-4, 1e-4, 1 / 3)


def test_tag_refuses_unknown_tags_and_parameters():
    with pytest.raises(ValueError, match="unknown optimiser tags"):
        tag(nn.Linear(2, 2), "wd")
    with pytest.raises(ValueError, match="no parameter bias"):
        tag(nn.Linear(2, 2, bias=False), NO_DECAY, names=("bias",))


def test_renaming_or_moving_a_module_keeps_its_group():
    """The groups follow the tags: under another name, the mapping network and a block keep their groups."""
    net, _ = preset_net("tiny")
    before = groups_of(net)
    by_group = {name: {id(p) for p in g["params"]} for name, g in before.items()}
    mapping, blocks = net.mapping, net.blocks
    del net.mapping, net.blocks
    net.conditioning = mapping
    net.stack = blocks
    after = {name: {id(p) for p in g["params"]} for name, g in groups_of(net).items()}
    assert after == by_group


def test_the_tags_survive_deepcopy_and_dtype_conversion():
    """The EMA copy is a deepcopy, and conversions may replace Parameter objects: the tags live on the
    modules, so both keep every parameter's group."""
    torch.manual_seed(0)
    config = load_preset("tiny")
    net = build_model(config.model, config.sharing)
    expected = members(net, groups_of(net))
    ema = copy.deepcopy(net)
    assert members(ema, groups_of(ema)) == expected
    swap = torch.__future__.get_swap_module_params_on_conversion()
    try:
        torch.__future__.set_swap_module_params_on_conversion(True)  # conversions swap in new Parameters
        net.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert members(net, groups_of(net)) == expected
