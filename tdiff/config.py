"""Typed configuration: one frozen dataclass per TOML section, presets, `--set` overrides.

A preset is a complete configuration. Loading one checks every key and value against the
dataclass fields below (type, allowed choices, range) and the cross-field rules in `validate`,
so a typo or an impossible value is one `UserError` line naming the key and the file, never a
KeyError halfway through a run. A field's range is part of its type (`Positive[int]`, `Fraction`);
every float, tuple elements included, must also be finite (TOML and `--set` accept nan and inf).

Precedence: dataclass defaults < preset file < `--set section.key=value` < dedicated CLI flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from tdiff.errors import UserError
from tdiff.sampler_registry import SAMPLER_NAMES

# Installed wheels carry the presets inside the package; a source checkout has them at the top.
_PACKAGED_PRESETS = Path(__file__).parent / "presets"
PRESET_DIR = _PACKAGED_PRESETS if _PACKAGED_PRESETS.is_dir() else Path(__file__).parent.parent / "presets"

# The paper's Table 1 columns, in its order.
TABLE1_PRESETS = ("d16", "d1s16", "d1s8", "d2s4ui", "d2s4i", "d2s8ui", "d2s8i", "d8")

LossWeighting = Literal["karras", "soft-min-snr", "snr"]
SigmaDensity = Literal["cosine-interpolated", "lognormal", "loguniform"]
RepeatConditioning = Literal["scale", "scale+embedding"]
SamplerName = Literal[SAMPLER_NAMES]  # tdiff.sampler_registry: one table of the samplers
SolverType = Literal["midpoint", "heun"]


@dataclass(frozen=True)
class Rule:
    """What a number must be beyond its type: a test and the words for it."""

    holds: Callable[[Any], bool]
    words: str


# Ranges, written into the field types: `width: Positive[int]`. A plain `float` is any finite number.
Number = TypeVar("Number", int, float)
Positive = Annotated[Number, Rule(lambda v: v > 0, "> 0")]
NonNegative = Annotated[Number, Rule(lambda v: v >= 0, ">= 0")]
Probability = Annotated[float, Rule(lambda v: 0 <= v <= 1, "in [0, 1]")]
Fraction = Annotated[float, Rule(lambda v: 0 <= v < 1, "in [0, 1)")]  # dropout, AdamW betas, EMA decay


@dataclass(frozen=True)
class ModelConfig:
    """The image-transformer-v1 denoiser (reference spec §1)."""

    image_size: Positive[int] = 32  # side of the square input, pixels; a multiple of patch_size
    channels: Positive[int] = 3  # image channels (3 RGB, 1 grey)
    num_classes: NonNegative[int] = 10  # class-conditional when > 0; the table has an extra "null" row for CFG
    patch_size: Positive[int] = 4  # side of a patch, pixels; 32/4 -> 64 tokens
    width: Positive[int] = 512  # d_model; the paper's appendix says 1024, the released configs 512
    head_dim: Positive[int] = 64  # per-head width, fixed at 64 in the reference
    d_ff: NonNegative[int] = 0  # feed-forward hidden width; 0 = width*8/3 rounded to a power-of-two grid
    mapping_layers: NonNegative[int] = 2  # residual GEGLU layers in the conditioning mapping network
    dropout: Fraction = 0.05  # after attention and inside every feed-forward layer
    checkpointing: bool = False  # recompute each block application in backward to save memory


@dataclass(frozen=True)
class SharingConfig:
    """How few distinct blocks simulate a deep stack (reference spec §2)."""

    depth: Positive[int] = 8  # distinct transformer blocks (parameters)
    substeps: Positive[int] = 1  # applications of each block; effective depth = depth * substeps
    interleaved: bool = True  # true: 1212... ; false: 11...22...
    # "scale": conditioning * (repeat + 1), the reference. "scale+embedding": the same plus a
    # learned per-repeat vector, zero-initialised so a fresh model equals the reference.
    repeat_conditioning: RepeatConditioning = "scale"


@dataclass(frozen=True)
class DiffusionConfig:
    """EDM preconditioning, loss and training noise levels (reference spec §4)."""

    sigma_data: Positive[float] = 0.5  # standard deviation of the data, in [-1, 1] pixel units
    sigma_min: Positive[float] = 0.01  # lowest noise level of the sampling schedule
    sigma_max: Positive[float] = 80.0  # highest noise level of the sampling schedule
    loss_weighting: LossWeighting = "soft-min-snr"
    sigma_density: SigmaDensity = "cosine-interpolated"  # how training draws sigma
    p_mean: float = -1.2  # log-normal density only: mean of ln(sigma)
    p_std: Positive[float] = 1.2  # log-normal density only: std of ln(sigma)
    augment_prob: Probability = 0.12  # probability of each non-flip Karras augmentation
    cond_dropout: Probability = 0.1  # probability a label is replaced by the null class (for CFG)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the run's rhythm (reference spec §4.6, §4.7)."""

    steps: Positive[int] = 2_000_000  # optimiser steps (AdamW updates, grad_accum micro-batches each) to train for
    batch_size: Positive[int] = 64  # images per process per micro-step
    grad_accum: Positive[int] = 1  # micro-steps per optimiser step
    lr: Positive[float] = 5e-4  # AdamW learning rate; the mapping groups use lr * mapping_lr_scale
    mapping_lr_scale: Positive[float] = 1 / 3
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    eps: Positive[float] = 1e-8
    weight_decay: NonNegative[float] = 1e-4  # on linear weights of the blocks and the mapping network only
    warmup_steps: NonNegative[int] = 0  # linear LR warm-up; 0 = constant LR from the first step
    grad_clip: NonNegative[float] = 1.0  # max global gradient norm; 0 disables clipping
    ema_inv_gamma: Positive[float] = 1.0  # inverse EMA: decay = 1 - (1 + k/inv_gamma)^-power
    ema_power: Positive[float] = 0.6667
    ema_max: Fraction = 0.9999
    log_every: Positive[int] = 25  # steps between metrics.jsonl lines
    demo_every: NonNegative[int] = 500  # steps between EMA sample grids; 0 = never
    save_every: Positive[int] = 10_000  # steps between checkpoints (and one at the end)
    keep_last: NonNegative[int] = 3  # checkpoints kept on disk; 0 = keep all
    eval_every: NonNegative[int] = 0  # steps between in-training FID/KID; 0 = never
    eval_n: Positive[int] = 2000  # samples (and reference images) for in-training FID/KID


@dataclass(frozen=True)
class RoutingConfig:
    """TREAD token routing in training (docs/acceleration.md); none by default.

    Route k lets a random fraction rates[k] of each sample's tokens skip the block applications
    starts[k]..ends[k] (0-based positions in the application order, end inclusive, so a route may
    span repeats of shared blocks) and re-enter unchanged after it. Evaluation and sampling never route.
    """

    rates: tuple[Fraction, ...] = ()  # fraction of tokens that bypass each route, in [0, 1)
    starts: tuple[NonNegative[int], ...] = ()  # first block application of each route, 0-based
    ends: tuple[NonNegative[int], ...] = ()  # last block application of each route, inclusive


@dataclass(frozen=True)
class SampleConfig:
    """Default sampling settings; the paper's evaluation sampler (reference spec §5)."""

    sampler: SamplerName = "dpmpp_2m_sde"
    steps: Positive[int] = 50  # sampler steps (model evaluations for one-stage samplers)
    rho: Positive[float] = 7.0  # Karras schedule curvature
    eta: NonNegative[float] = 0.0  # ancestral / SDE noise; 0 = deterministic
    solver_type: SolverType = "heun"  # dpmpp_2m_sde's second-order correction
    cfg_scale: NonNegative[float] = 1.0  # classifier-free guidance; 1 = plain conditional model


@dataclass(frozen=True)
class Config:
    """A complete tdiff configuration: one field per TOML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def sections() -> dict[str, type]:
    """Section name -> dataclass, in file order."""
    return {f.name: f.default_factory().__class__ for f in fields(Config)}


def _field_types(section_cls: type) -> dict[str, Any]:
    """Field name -> type, with its `Rule` where it has one (`Annotated[int, rule]`)."""
    return typing.get_type_hints(section_cls, include_extras=True)


def all_keys() -> list[str]:
    """Every `section.key` a preset or `--set` may name."""
    return [f"{s}.{k}" for s, cls in sections().items() for k in _field_types(cls)]


def _check_value(key: str, value: Any, expected: Any, where: str) -> Any:
    """Return `value` coerced to the field type, or raise a one-line UserError."""
    rule = None
    if typing.get_origin(expected) is Annotated:
        expected, rule = typing.get_args(expected)
    origin = typing.get_origin(expected)
    if origin is Literal:
        choices = typing.get_args(expected)
        if value not in choices:
            raise UserError(f"{key} = {value!r} in {where}: must be one of {', '.join(choices)}")
        return value
    if origin is tuple:
        item_type, *rest = typing.get_args(expected)
        length = None if rest == [Ellipsis] else 1 + len(rest)  # tuple[int, ...]: any length
        if not isinstance(value, (list, tuple)) or length not in (None, len(value)):
            count = f"{length} " if length is not None else ""
            raise UserError(f"{key} = {value!r} in {where}: must be a list of {count}numbers")
        return tuple(_check_value(key, v, item_type, where) for v in value)
    # bool is a subclass of int in Python, so it must be refused explicitly for numbers.
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise UserError(f"{key} = {value!r} in {where}: expected {expected.__name__}, got {type(value).__name__}")
    finite = expected is not float or math.isfinite(value)
    if not finite or (rule is not None and not rule.holds(value)):
        raise UserError(f"{key} = {value!r} in {where}: must be {_requirement(expected, rule)}")
    return value


def _requirement(expected: type, rule: Rule | None) -> str:
    """What a value must be: its rule, and "finite" for a float unless the rule already bounds it."""
    words = [rule.words] if rule else []
    if expected is float and (rule is None or rule.holds(math.inf)):
        words.insert(0, "finite")
    return " and ".join(words)


def _unknown_key(key: str, where: str) -> UserError:
    close = difflib.get_close_matches(key, all_keys(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else f" (known sections: {', '.join(sections())})"
    return UserError(f"{key} in {where}: no such key{hint}")


def from_dict(data: dict[str, Any], where: str, base: Config | None = None) -> Config:
    """Build a Config from nested {section: {key: value}}, on top of `base` (default: defaults)."""
    config = base or Config()
    known = sections()
    for section, values in data.items():
        if section not in known:
            raise _unknown_key(section, where)
        if not isinstance(values, dict):
            raise UserError(f"{section} in {where}: expected a [{section}] table")
        types = _field_types(known[section])
        updates = {}
        for key, value in values.items():
            if key not in types:
                raise _unknown_key(f"{section}.{key}", where)
            updates[key] = _check_value(f"{section}.{key}", value, types[key], where)
        config = replace(config, **{section: replace(getattr(config, section), **updates)})
    validate(config, where)
    return config


def validate(config: Config, where: str) -> None:
    """Cross-field rules: the ones a single field's type cannot express."""
    m, d = config.model, config.diffusion
    if m.image_size % m.patch_size:
        raise UserError(
            f"model.image_size = {m.image_size} in {where}: not divisible by model.patch_size = {m.patch_size}"
        )
    if m.width % m.head_dim:
        raise UserError(f"model.width = {m.width} in {where}: not a multiple of model.head_dim = {m.head_dim}")
    if m.head_dim % 4:
        raise UserError(
            f"model.head_dim = {m.head_dim} in {where}: must be a multiple of 4 "
            "(axial RoPE rotates pairs along two axes)"
        )
    if d.sigma_min >= d.sigma_max:
        raise UserError(
            f"diffusion.sigma_min = {d.sigma_min} in {where}: must be below diffusion.sigma_max = {d.sigma_max}"
        )
    _validate_routes(config, where)


def _validate_routes(config: Config, where: str) -> None:
    """One (rate, start, end) per route; start <= end < effective depth; no two routes share an application."""
    r, s = config.routing, config.sharing
    if not len(r.rates) == len(r.starts) == len(r.ends):
        raise UserError(
            f"routing.rates = {list(r.rates)} in {where}: routing.rates, routing.starts and "
            f"routing.ends need one entry per route (got {len(r.rates)}, {len(r.starts)}, {len(r.ends)})"
        )
    applications = s.depth * s.substeps
    spans = sorted(zip(r.starts, r.ends))
    for start, end in spans:
        if not start <= end < applications:
            raise UserError(
                f"routing.ends = {list(r.ends)} in {where}: route {start}..{end} must have "
                f"start <= end <= {applications - 1}, the last block application "
                f"(sharing.depth x sharing.substeps - 1; positions count from 0, end inclusive)"
            )
    for (start, end), (next_start, next_end) in zip(spans, spans[1:]):
        if next_start <= end:
            raise UserError(
                f"routing.starts = {list(r.starts)} in {where}: routes {start}..{end} and "
                f"{next_start}..{next_end} overlap; each block application may be in one route"
            )


def preset_names() -> list[str]:
    """Names of the presets shipped with tdiff."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name_or_path: str) -> Path:
    """Resolve a preset name (`d2s8i`) or a TOML file path."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists():
        if not candidate.is_file():
            raise UserError(f"preset file {name_or_path} not found")
        return candidate
    shipped = PRESET_DIR / f"{name_or_path}.toml"
    if not shipped.is_file():
        raise UserError(f"unknown preset '{name_or_path}' (known: {', '.join(preset_names())})")
    return shipped


def load_preset(name_or_path: str) -> Config:
    """Read and validate a preset; every key of every section is checked."""
    path = preset_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    return from_dict(data, where=str(path))


def loads(text: str, where: str, *, complete: bool = False) -> Config:
    """Parse a configuration from TOML text (e.g. a checkpoint's metadata). Keys left out take their
    defaults, unless `complete`: then every key must be there (a file tdiff wrote whole, such as a
    run's config.toml, that lacks one was cut short)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where}: not valid TOML ({e})") from None
    missing = [key for key in all_keys() if key.split(".")[1] not in data.get(key.split(".")[0], {})]
    if complete and missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"{where} is incomplete (no {shown})")
    return from_dict(data, where=where)


def _parse_override(item: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value); the value is read as a TOML value."""
    name, sep, raw = item.partition("=")
    name = name.strip()
    if not sep or "." not in name:
        raise UserError(f"--set {item}: expected section.key=value (e.g. train.lr=3e-4)")
    section, key = name.split(".", 1)
    types = _field_types(sections()[section]) if section in sections() else {}
    if key not in types:
        raise _unknown_key(name, "--set")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        # A bare word is accepted for string fields only: `--set sample.sampler=heun`.
        value = raw.strip()
    return section, key, value


def apply_overrides(config: Config, items: list[str]) -> Config:
    """Apply `--set section.key=value` items, type-checked like a preset."""
    nested: dict[str, dict[str, Any]] = {}
    for item in items:
        section, key, value = _parse_override(item)
        nested.setdefault(section, {})[key] = value
    return from_dict(nested, where="--set", base=config) if nested else config


def with_values(config: Config, **values: Any) -> Config:
    """Set `section__key=value` pairs (the CLI's dedicated flags), checked like `--set`."""
    nested: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        section, key = name.split("__", 1)
        nested.setdefault(section, {})[key] = value
    return from_dict(nested, where="the command line", base=config)


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    return {s: dataclasses.asdict(getattr(config, s)) for s in sections()}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def to_toml(config: Config) -> str:
    """The complete configuration as TOML; `loads(to_toml(c)) == c`."""
    lines = []
    for section, values in to_dict(config).items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def resolved_d_ff(model: ModelConfig) -> int:
    """Feed-forward width: the configured one, or width*8/3 snapped to a power-of-two grid."""
    return model.d_ff or round_to_power_of_two(model.width * 8 / 3, tol=0.05)


def round_to_power_of_two(x: float, tol: float) -> int:
    """Round x to a multiple of the coarsest power of two 2^i that stays within `tol` of x.

    Tries i from ceil(log2 x) - 1 down to 0: 512*8/3 -> 1408 (11 * 128), 1024*8/3 -> 2816.
    """
    top = max(math.ceil(math.log2(x)) - 1, 0)
    for step in (2**i for i in range(top, -1, -1)):
        rounded = step * round(x / step)
        if rounded and abs(rounded - x) / x <= tol:
            return rounded
    return round(x)
