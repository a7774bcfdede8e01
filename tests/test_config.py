"""Configuration: presets, validation at the boundary, `--set` overrides and their precedence."""

import math
import typing

import pytest

from tdiff.config import (
    TABLE1_PRESETS,
    Config,
    all_keys,
    apply_overrides,
    load_preset,
    loads,
    preset_names,
    sections,
    to_dict,
    to_toml,
    with_values,
)
from tdiff.errors import UserError

# ------------------------------------------------------------------------------------------------
# Shipped presets


def test_every_table1_preset_is_shipped_plus_tiny():
    assert TABLE1_PRESETS == ("d16", "d1s16", "d1s8", "d2s4ui", "d2s4i", "d2s8ui", "d2s8i", "d8")
    assert set(TABLE1_PRESETS) | {"tiny", "d2s8i-tread", "d16-tread"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())  # every shipped preset, Table 1 or not
def test_preset_loads_and_round_trips(name):
    config = load_preset(name)
    assert isinstance(config, Config)
    assert loads(to_toml(config), where="round trip") == config


def test_round_trip_keeps_non_default_values():
    config = apply_overrides(
        Config(),
        [
            "train.betas=[0.8, 0.99]",
            'sample.sampler="heun"',
            "sharing.interleaved=false",
            "train.lr=3e-4",
            'sharing.repeat_conditioning="scale+embedding"',
        ],
    )
    again = loads(to_toml(config), where="round trip")
    assert again == config and again.train.betas == (0.8, 0.99)
    assert math.isclose(again.train.mapping_lr_scale, 1 / 3, rel_tol=0, abs_tol=0)


# (depth, substeps, interleaved) of spec §2.6
SHARING = {
    "d16": (16, 1, False),
    "d1s16": (1, 16, True),
    "d1s8": (1, 8, True),
    "d2s4ui": (2, 4, False),
    "d2s4i": (2, 4, True),
    "d2s8ui": (2, 8, False),
    "d2s8i": (2, 8, True),
    "d8": (8, 1, False),
}


@pytest.mark.parametrize("name", TABLE1_PRESETS)
def test_table1_preset_holds_the_released_hyperparameters(name):
    c = load_preset(name)
    m, d, t = c.model, c.diffusion, c.train
    assert (m.image_size, m.channels, m.num_classes, m.patch_size) == (32, 3, 10, 4)
    assert (m.width, m.head_dim, m.d_ff, m.mapping_layers, m.dropout) == (512, 64, 0, 2, 0.05)
    assert d.augment_prob == 0.12 and d.cond_dropout == 0.1
    assert (d.loss_weighting, d.sigma_density) == ("soft-min-snr", "cosine-interpolated")
    assert (d.sigma_min, d.sigma_max, d.sigma_data) == (0.01, 80.0, 0.5)
    assert (t.lr, t.betas, t.eps, t.weight_decay, t.warmup_steps) == (5e-4, (0.9, 0.95), 1e-8, 1e-4, 0)
    assert t.mapping_lr_scale == pytest.approx(1 / 3)
    assert (t.ema_inv_gamma, t.ema_power, t.ema_max) == (1.0, 0.6667, 0.9999)
    assert t.grad_clip == 1.0
    assert (c.sample.sampler, c.sample.steps, c.sample.eta, c.sample.solver_type, c.sample.cfg_scale) == (
        "dpmpp_2m_sde",
        50,
        0.0,
        "heun",
        1.0,
    )
    s = c.sharing
    assert (s.depth, s.substeps, s.interleaved) == SHARING[name]
    assert s.repeat_conditioning == "scale"


def test_table1_presets_differ_only_in_sharing():
    base = to_dict(load_preset("d2s8i"))
    for name in TABLE1_PRESETS:
        other = to_dict(load_preset(name))
        assert {k: v for k, v in other.items() if k != "sharing"} == {
            k: v for k, v in base.items() if k != "sharing"
        }, name


def test_tiny_preset_is_small():
    c = load_preset("tiny")
    assert c.model.width == 64 and c.model.width % c.model.head_dim == 0
    assert c.sharing.depth * c.sharing.substeps <= 4 and c.train.steps <= 1000


# ------------------------------------------------------------------------------------------------
# Validation errors: one line, naming the key and the file


def write(tmp_path, text, name="preset.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(path) -> str:
    with pytest.raises(UserError) as info:
        load_preset(str(path))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_the_file_and_suggests(tmp_path):
    path = write(tmp_path, "[model]\nwidht = 512\n")
    message = load_error(path)
    assert "model.widht" in message and str(path) in message and "did you mean model.width?" in message


def test_unknown_section(tmp_path):
    message = load_error(write(tmp_path, "[modle]\nwidth = 512\n"))
    assert "modle" in message and "model" in message


@pytest.mark.parametrize(
    "line, expected",
    [
        ('width = "512"', "expected int, got str"),
        ("width = true", "expected int, got bool"),
        ("width = 512.0", "expected int, got float"),
        ("dropout = false", "expected float, got bool"),
        ("checkpointing = 1", "expected bool, got int"),
    ],
)
def test_wrong_type(tmp_path, line, expected):
    path = write(tmp_path, f"[model]\n{line}\n")
    message = load_error(path)
    assert f"model.{line.split()[0]}" in message and expected in message and str(path) in message


def test_int_is_accepted_for_a_float_field(tmp_path):
    config = load_preset(str(write(tmp_path, "[train]\nlr = 1\n")))
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


@pytest.mark.parametrize(
    "text, key, why",
    [
        ("[model]\nimage_size = 30\n", "model.image_size", "not divisible by model.patch_size"),
        ("[model]\nwidth = 100\n", "model.width", "not a multiple of model.head_dim"),
        ("[model]\nwidth = 0\n", "model.width", "> 0"),
        ("[sharing]\ndepth = 0\n", "sharing.depth", "> 0"),
        ("[sharing]\nsubsteps = -2\n", "sharing.substeps", "> 0"),
        ("[train]\nlr = -1e-4\n", "train.lr", "> 0"),
        ("[train]\nweight_decay = -1.0\n", "train.weight_decay", ">= 0"),
        ("[diffusion]\naugment_prob = 1.5\n", "diffusion.augment_prob", "in [0, 1]"),
        ("[diffusion]\ncond_dropout = -0.1\n", "diffusion.cond_dropout", "in [0, 1]"),
        ("[model]\ndropout = 1.0\n", "model.dropout", "in [0, 1)"),
        ("[train]\nbetas = [0.9, 1.5]\n", "train.betas", "in [0, 1)"),
        ("[train]\nbetas = [0.9]\n", "train.betas", "list of 2"),
        ("[diffusion]\nsigma_min = 100.0\n", "diffusion.sigma_min", "below diffusion.sigma_max"),
        ('[diffusion]\nloss_weighting = "l2"\n', "diffusion.loss_weighting", "must be one of karras"),
        ('[sample]\nsampler = "ddim"\n', "sample.sampler", "dpmpp_2m_sde"),
        ('[sharing]\nrepeat_conditioning = "embedding"\n', "sharing.repeat_conditioning", "scale+embedding"),
        ("model = 3\n", "model", "expected a [model] table"),
    ],
)
def test_impossible_values(tmp_path, text, key, why):
    path = write(tmp_path, text)
    message = load_error(path)
    assert message.startswith(key) and why in message and str(path) in message


def test_malformed_toml(tmp_path):
    path = write(tmp_path, "[model\nwidth = 512\n")
    message = load_error(path)
    assert str(path) in message and "not valid TOML" in message


def test_unknown_preset_name_lists_the_known_ones():
    with pytest.raises(UserError, match=r"unknown preset 'd2s8x' \(known: .*d2s8i.*\)"):
        load_preset("d2s8x")


def test_missing_preset_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(UserError, match="not found") as info:
        load_preset(str(missing))
    assert str(missing) in str(info.value)


def test_partial_preset_keeps_defaults_for_the_rest(tmp_path):
    config = load_preset(str(write(tmp_path, "[sharing]\ndepth = 3\n")))
    assert config.sharing.depth == 3
    assert config.model == Config().model and config.train == Config().train


def test_loads_names_its_source():
    with pytest.raises(UserError, match="checkpoint metadata"):
        loads("[model]\nwidth = 'x'\n", where="checkpoint metadata")
    with pytest.raises(UserError, match="checkpoint metadata: not valid TOML"):
        loads("[model", where="checkpoint metadata")


# ------------------------------------------------------------------------------------------------
# --set overrides


def override_error(*items) -> str:
    with pytest.raises(UserError) as info:
        apply_overrides(Config(), list(items))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_set_values_are_read_as_toml_and_type_checked():
    c = apply_overrides(
        Config(),
        [
            "train.lr=3e-4",
            "model.width=1024",
            "sharing.interleaved=false",
            "train.betas=[0.8, 0.99]",
            "train.grad_clip=2",
        ],
    )
    assert (c.train.lr, c.model.width, c.sharing.interleaved) == (3e-4, 1024, False)
    assert c.train.betas == (0.8, 0.99) and isinstance(c.train.betas, tuple)
    assert c.train.grad_clip == 2.0 and isinstance(c.train.grad_clip, float)


def test_bare_word_only_for_string_fields():
    assert apply_overrides(Config(), ["sample.sampler=heun"]).sample.sampler == "heun"
    assert apply_overrides(Config(), ['sample.sampler="euler"']).sample.sampler == "euler"
    assert "expected int, got str" in override_error("model.width=wide")
    assert "expected bool, got str" in override_error("sharing.interleaved=yes")
    assert "must be one of" in override_error("sample.sampler=ddim")


@pytest.mark.parametrize(
    "item, expected",
    [
        ("model.width=true", "expected int, got bool"),
        ("model.width=512.0", "expected int, got float"),
        ("model.width=100", "not a multiple of model.head_dim"),
        ("sharing.depth=0", "must be > 0"),
        ("diffusion.augment_prob=2", "must be in [0, 1]"),
        ("train.betas=0.9", "list of 2"),
    ],
)
def test_set_rejects_bad_values(item, expected):
    message = override_error(item)
    assert message.startswith(item.split("=")[0]) and "--set" in message and expected in message


def test_set_unknown_key_suggests_the_closest():
    message = override_error("model.widht=3")
    assert message.startswith("model.widht") and "did you mean model.width?" in message
    assert "did you mean train.lr?" in override_error("train.lr_=1")
    assert "known sections" in override_error("nosuch.thing=1")


@pytest.mark.parametrize("item", ["width=3", "model.width", "=3"])
def test_set_needs_section_key_value(item):
    assert "expected section.key=value" in override_error(item)


def test_later_set_wins():
    assert apply_overrides(Config(), ["train.lr=1e-3", "train.lr=2e-3"]).train.lr == 2e-3


def test_precedence_defaults_preset_set_flags():
    assert Config().sharing.depth == 8
    preset = load_preset("d2s8i")
    assert preset.sharing.depth == 2  # preset beats defaults
    overridden = apply_overrides(preset, ["sharing.depth=4", "train.lr=1e-3"])
    assert overridden.sharing.depth == 4  # --set beats the preset
    assert overridden.sharing.substeps == 8  # ... and leaves the rest of it alone
    flagged = with_values(overridden, sharing__depth=3)
    assert flagged.sharing.depth == 3  # a dedicated flag beats --set
    assert flagged.train.lr == 1e-3


def test_flags_are_checked_like_set():
    with pytest.raises(UserError, match="sharing.depth = 0 in the command line"):
        with_values(Config(), sharing__depth=0)


def test_every_key_is_section_dot_field():
    keys = all_keys()
    assert "model.width" in keys and "train.betas" in keys and "sample.cfg_scale" in keys
    assert len(keys) == len(set(keys)) == sum(len(v) for v in to_dict(Config()).values())


# ------------------------------------------------------------------------------------------------
# Non-finite floats: TOML and --set read nan and inf as floats; every float field refuses them

FLOAT_KEYS = [
    f"{section}.{key}"
    for section, values in to_dict(Config()).items()
    for key, value in values.items()
    if isinstance(value, float)
]
# The fields that accepted inf (or p_mean nan) and then drew black images or failed mid-run.
UNBOUNDED_KEYS = [
    "diffusion.sigma_data",
    "diffusion.sigma_max",
    "diffusion.p_mean",
    "train.ema_inv_gamma",
    "train.grad_clip",
    "train.eps",
    "train.lr",
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_set_refuses_non_finite_floats(key, value):
    message = override_error(f"{key}={value}")
    assert message.startswith(f"{key} = {value} in --set: must be ")
    assert "finite" in message or "in [0, 1" in message  # a range within [0, 1] already says it


@pytest.mark.parametrize("value", ["nan", "inf", "+inf", "-inf"])
@pytest.mark.parametrize("key", UNBOUNDED_KEYS)
def test_preset_file_refuses_non_finite_floats(tmp_path, key, value):
    section, name = key.split(".")
    path = write(tmp_path, f"[{section}]\n{name} = {value}\n")
    message = load_error(path)
    assert message.startswith(f"{key} = {value.lstrip('+')} in {path}: must be finite")


@pytest.mark.parametrize(
    "text, key",
    [
        ("[train]\nbetas = [0.9, nan]\n", "train.betas"),
        ("[train]\nbetas = [inf, 0.95]\n", "train.betas"),
        ("[routing]\nrates = [inf]\nstarts = [0]\nends = [0]\n", "routing.rates"),
        ("[routing]\nrates = [0.5, nan]\nstarts = [0, 2]\nends = [1, 3]\n", "routing.rates"),
    ],
)
def test_tuple_elements_must_be_finite(tmp_path, text, key):
    path = write(tmp_path, text)
    message = load_error(path)
    assert message.startswith(f"{key} = ") and "must be in [0, 1)" in message and str(path) in message


@pytest.mark.parametrize(
    "item, expected",
    [
        ("diffusion.sigma_data=inf", "diffusion.sigma_data = inf in --set: must be finite and > 0"),
        ("diffusion.p_mean=nan", "diffusion.p_mean = nan in --set: must be finite"),
        ("train.grad_clip=inf", "train.grad_clip = inf in --set: must be finite and >= 0"),
        ("train.ema_power=0", "train.ema_power = 0.0 in --set: must be finite and > 0"),
        ("sample.eta=-0.5", "sample.eta = -0.5 in --set: must be finite and >= 0"),
        ("train.ema_max=1", "train.ema_max = 1.0 in --set: must be in [0, 1)"),
    ],
)
def test_the_refusal_says_what_the_value_must_be(item, expected):
    assert override_error(item) == expected


@pytest.mark.parametrize(
    "values",
    [
        {"sample__rho": 0.0},
        {"sample__rho": math.nan},
        {"diffusion__sigma_max": math.inf},
        {"sample__cfg_scale": math.inf},
        {"sample__cfg_scale": -1.0},
        {"sample__eta": math.inf},
    ],
)
def test_flags_get_the_same_rules(values):
    """`tdiff sample`'s --rho, --sigma-max, --cfg-scale and --eta go through with_values."""
    ((name, value),) = values.items()
    with pytest.raises(UserError) as info:
        with_values(Config(), **values)
    message = str(info.value)
    assert message.startswith(f"{name.replace('__', '.')} = {value!r} in the command line: must be")
    assert "\n" not in message


def test_p_mean_takes_any_finite_value():
    assert apply_overrides(Config(), ["diffusion.p_mean=-3.5"]).diffusion.p_mean == -3.5
    assert with_values(Config(), diffusion__p_mean=2).diffusion.p_mean == 2.0


def test_every_number_has_a_range_but_p_mean():
    """The rules sit in the field types (`Positive[int]`, `Fraction`): a new number field states its own."""
    unbounded = []
    for section, cls in sections().items():
        for key, hint in typing.get_type_hints(cls, include_extras=True).items():
            element = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else hint
            if element in (int, float):  # a bare number type, no Annotated rule
                unbounded.append(f"{section}.{key}")
    assert unbounded == ["diffusion.p_mean"]
