"""The denoiser network: k-diffusion's image transformer v1 with shared blocks (spec §1, §2).

Reading order: norms, rotary positions, the two sub-blocks, the transformer block, the
mapping network that turns (noise level, augmentation, class) into one conditioning vector,
and `ImageTransformer`, which patches the image, runs its few distinct blocks along the
sharing schedule, and unpatches. No Linear layer has a bias. The output projections and the
adaptive-norm projections start at zero, so a fresh network outputs exactly zero and the
EDM denoiser around it starts as D(x) = c_skip * x.

The network sees c_in-scaled pixels and c_noise = ln(sigma)/4; the scalings themselves live
in `tdiff.diffusion`.

Every parameter is given its optimiser role where its module is built (`tag`, `tag_module`), and
`param_groups` forms AdamW's groups from those tags alone, never from module names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from tdiff import hardware
from tdiff.acceleration import BlockCache, Routing
from tdiff.config import ModelConfig, SharingConfig, resolved_d_ff
from tdiff.errors import UserError
from tdiff.sharing import Application, block_schedule, repeat_multiplier

AUG_COND_DIM = 9  # length of the Karras augmentation conditioning vector


# --------------------------------------------------------------------------------------------
# Optimiser roles (spec §1.8), declared where each parameter is created
#
# Every parameter carries exactly one of DECAY / NO_DECAY, and MAPPING_RATE where it trains at the
# mapping network's rate. The tags live on the module that owns the parameter, under the
# parameter's own name, so they survive deepcopy (the EMA copy) and dtype or device moves, which
# may replace the Parameter objects themselves.

DECAY = "decay"  # AdamW decays it: the Linear weights inside the blocks and the mapping network
NO_DECAY = "no_decay"  # the rest: norm scales, embeddings, QK temperatures, RoPE frequencies, outer projections
MAPPING_RATE = "mapping_rate"  # lr * mapping_lr_scale: mapping network, adaptive-norm projections, repeat embeddings
ROLE_TAGS = frozenset({DECAY, NO_DECAY, MAPPING_RATE})
_TAGS_ATTRIBUTE = "optimizer_tags"  # on a module: {own parameter name: frozenset of tags}


def tag(owner: nn.Module, *tags: str, names: tuple[str, ...] | None = None) -> nn.Module:
    """Add `tags` to `owner`'s own parameters (those in `names`, else all of them, not its submodules').

    Returns `owner`, so a layer is tagged where it is built: `self.up = tag(nn.Linear(...), DECAY)`.
    """
    unknown = set(tags) - ROLE_TAGS
    if unknown:
        raise ValueError(f"unknown optimiser tags {sorted(unknown)} (known: {', '.join(sorted(ROLE_TAGS))})")
    own = dict(owner.named_parameters(recurse=False))
    names = tuple(own) if names is None else names
    missing = set(names) - set(own)
    if missing:
        raise ValueError(f"{type(owner).__name__} has no parameter {', '.join(sorted(missing))}")
    table = owner.__dict__.setdefault(_TAGS_ATTRIBUTE, {})
    for name in names:
        table[name] = table.get(name, frozenset()) | frozenset(tags)
    return owner


def tag_module(module: nn.Module, *tags: str) -> nn.Module:
    """Add `tags` to every parameter of `module` and its submodules (for MAPPING_RATE: a whole
    network). It declares no DECAY / NO_DECAY, so a parameter nobody tagged where it was created
    still has no role."""
    for owner in module.modules():
        tag(owner, *tags)
    return module


def parameter_tags(owner: nn.Module, name: str) -> frozenset[str]:
    """The tags of `owner`'s own parameter `name`; empty if it has none."""
    return getattr(owner, _TAGS_ATTRIBUTE, {}).get(name, frozenset())


def zero_init(layer: nn.Linear) -> nn.Linear:
    """Start a residual branch's output (or a modulation) at exactly zero."""
    nn.init.zeros_(layer.weight)
    return layer


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * scale over the last dim; the mean of squares in at least float32."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    mean_sq = x.to(dtype).pow(2).mean(dim=-1, keepdim=True)
    return x * (scale.to(dtype) * torch.rsqrt(mean_sq + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(width))
        tag(self, NO_DECAY)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, self.eps)


class AdaRMSNorm(nn.Module):
    """RMS normalisation whose scale is 1 + A·cond; A starts at zero (a plain RMSNorm)."""

    def __init__(self, width: int, cond_width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        # A matrix inside a block (decayed) that reads the mapping output (at the mapping rate).
        self.linear = tag(zero_init(nn.Linear(cond_width, width, bias=False)), DECAY, MAPPING_RATE)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x: (N, L, w), cond: (N, 1, w) -> the scale broadcasts over tokens.
        return rms_norm(x, self.linear(cond) + 1, self.eps)


def geglu(x: torch.Tensor) -> torch.Tensor:
    """First half is the value, second half the gate: a * GELU(b), exact erf GELU."""
    a, b = x.chunk(2, dim=-1)
    return a * F.gelu(b)


class QKNorm(nn.Module):
    """Cosine attention with a learned per-head temperature (init 10, capped at 100).

    q and k are RMS-normalised and each scaled by exp(g/2) * d_h^(-1/4); SDPA's own 1/sqrt(d_h)
    then cancels the rest, so a logit is exp(g) * cos(q, k).
    """

    def __init__(self, n_heads: int, head_dim: int, eps: float = 1e-6, max_scale: float = 100.0):
        super().__init__()
        self.eps = eps
        self.head_dim = head_dim
        self.max_log_scale = math.log(max_scale)
        self.log_scale = nn.Parameter(torch.full([n_heads], math.log(10.0)))
        tag(self, NO_DECAY)
        self.clamp_()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(max=self.max_log_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, n_h, L, d_h); one scale per head.
        scale = torch.exp(self.log_scale[:, None, None] / 2 - 0.25 * math.log(self.head_dim))
        return rms_norm(x, scale, self.eps)  # scale (n_h, 1, 1) broadcasts over tokens and dims


class AxialRoPE(nn.Module):
    """Axial rotary position embedding: the first half of the pairs rotate with y, the rest with x.

    Each head has learned log-frequencies for both axes, initialised log-evenly from pi to 5*pi.
    The d_h dims form d_h/2 adjacent pairs (2k, 2k+1); pairs 0..d_h/4-1 rotate by y * freq_h,
    the rest by x * freq_w.
    """

    def __init__(self, n_heads: int, head_dim: int, max_freq: float = 10.0):
        super().__init__()
        log_freqs = torch.linspace(math.log(math.pi), math.log(max_freq * math.pi / 2), head_dim // 4)
        self.freqs_h = nn.Parameter(log_freqs.expand(n_heads, -1).clone())
        self.freqs_w = nn.Parameter(log_freqs.expand(n_heads, -1).clone())
        tag(self, NO_DECAY)

    def angles(self, pos: torch.Tensor) -> torch.Tensor:
        # pos: (L, 2) as (y, x) -> angles (n_h, L, d_h/2); per-sample positions (N, L', 2) of
        # routed tokens -> (N, n_h, L', d_h/2)
        theta_h = pos[..., None, 0:1] * self.freqs_h.exp()  # (..., L, n_h, d_h/4)
        theta_w = pos[..., None, 1:2] * self.freqs_w.exp()
        return torch.cat([theta_h, theta_w], dim=-1).transpose(-3, -2)

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        # x: (N, n_h, L, d_h) viewed as pairs (a, b) -> (a cos - b sin, b cos + a sin), computed in at
        # least float32 (float64 stays float64) as one complex product (a + ib)·e^{iθ}: the same
        # roundings as the four real products (bit-identical in float64), in one pass instead of five.
        # Under torch.compile the four real products instead: inductor fuses them into one kernel but
        # cannot generate code for complex numbers.
        pairs = x.to(torch.promote_types(x.dtype, torch.float32)).contiguous().unflatten(-1, (-1, 2))
        if torch.compiler.is_compiling():
            a, b, cos, sin = pairs[..., 0], pairs[..., 1], theta.cos(), theta.sin()
            return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).to(x.dtype)
        rotated = torch.view_as_complex(pairs) * torch.polar(torch.ones_like(theta), theta)
        return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def patch_positions(grid_h: int, grid_w: int) -> torch.Tensor:
    """Cell centres of [-1, 1] for a grid of patches, row-major, (y, x) -> (L, 2)."""
    ys = (torch.arange(grid_h) + 0.5) / grid_h * 2 - 1
    xs = (torch.arange(grid_w) + 0.5) / grid_w * 2 - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)


class SelfAttention(nn.Module):
    def __init__(self, width: int, head_dim: int, dropout: float):
        super().__init__()
        self.n_heads = width // head_dim
        self.norm = AdaRMSNorm(width, width)
        self.qkv = tag(nn.Linear(width, 3 * width, bias=False), DECAY)
        self.qk_norm = QKNorm(self.n_heads, head_dim)
        self.rope = AxialRoPE(self.n_heads, head_dim)
        self.dropout = nn.Dropout(dropout)
        self.out = tag(zero_init(nn.Linear(width, width, bias=False)), DECAY)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        skip = x
        qkv = self.qkv(self.norm(x, cond))
        q, k, v = rearrange(qkv, "n l (t h e) -> t n h l e", t=3, h=self.n_heads)
        theta = self.rope.angles(pos)  # (n_h, L, d_h/2), or (N, n_h, L, d_h/2) per sample
        q = self.rope(self.qk_norm(q), theta)
        k = self.rope(self.qk_norm(k), theta)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, n_h, L, d_h)
        x = rearrange(x, "n h l e -> n l (h e)")
        return self.out(self.dropout(x)) + skip


class FeedForward(nn.Module):
    """Pre-norm residual GEGLU; adaptive norm in the trunk, plain RMSNorm in the mapping net."""

    def __init__(self, width: int, d_ff: int, dropout: float, cond_width: int | None):
        super().__init__()
        self.norm = AdaRMSNorm(width, cond_width) if cond_width else RMSNorm(width)
        self.up = tag(nn.Linear(width, 2 * d_ff, bias=False), DECAY)
        self.dropout = nn.Dropout(dropout)
        self.down = tag(zero_init(nn.Linear(d_ff, width, bias=False)), DECAY)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x, cond) if cond is not None else self.norm(x)
        return self.down(self.dropout(geglu(self.up(h)))) + x


class TransformerBlock(nn.Module):
    def __init__(self, width: int, d_ff: int, head_dim: int, dropout: float):
        super().__init__()
        self.attn = SelfAttention(width, head_dim, dropout)
        self.ff = FeedForward(width, d_ff, dropout, cond_width=width)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.ff(self.attn(x, pos, cond), cond)


class FourierFeatures(nn.Module):
    """[cos(2π x Bᵀ), sin(2π x Bᵀ)] with a fixed random B ~ N(0, 1), saved with the weights."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("weight", torch.randn(out_features // 2, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * x @ self.weight.T
        return torch.cat([f.cos(), f.sin()], dim=-1)


class MappingNetwork(nn.Module):
    """RMSNorm -> n residual GEGLU layers -> RMSNorm, at the trunk's width and d_ff."""

    def __init__(self, n_layers: int, width: int, d_ff: int, dropout: float):
        super().__init__()
        self.in_norm = RMSNorm(width)
        self.layers = nn.ModuleList([FeedForward(width, d_ff, dropout, None) for _ in range(n_layers)])
        self.out_norm = RMSNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.out_norm(x)


class ImageTransformer(nn.Module):
    """The network F of the EDM denoiser: F(c_in·x, c_noise, aug_cond, class_cond) -> (N, C, H, W)."""

    def __init__(self, model: ModelConfig, sharing: SharingConfig):
        super().__init__()
        w, d_ff, p = model.width, resolved_d_ff(model), model.patch_size
        self.num_classes = model.num_classes
        self.patch_size = p
        self.checkpointing = model.checkpointing
        self.schedule: tuple[Application, ...] = block_schedule(sharing.depth, sharing.substeps, sharing.interleaved)
        grid = model.image_size // p
        self.register_buffer("pos", patch_positions(grid, grid), persistent=False)

        # Conditioning: noise level, augmentation and class, summed and mapped once per forward.
        self.time_emb = FourierFeatures(1, w)
        # The projections and the class table sit outside the blocks and the mapping network: no decay.
        self.time_in_proj = tag(nn.Linear(w, w, bias=False), NO_DECAY)
        self.aug_emb = FourierFeatures(AUG_COND_DIM, w)
        self.aug_in_proj = tag(nn.Linear(w, w, bias=False), NO_DECAY)
        # The extra row (index num_classes) is "no class", for label dropout and guidance.
        self.class_emb = tag(nn.Embedding(model.num_classes + 1, w), NO_DECAY) if model.num_classes else None
        self.mapping = tag_module(MappingNetwork(model.mapping_layers, w, d_ff, model.dropout), MAPPING_RATE)
        # Our addition: a learned vector per repeat index, zero so a fresh model is the reference.
        self.repeat_emb = None
        if sharing.repeat_conditioning == "scale+embedding":
            self.repeat_emb = nn.Parameter(torch.zeros(sharing.substeps, w))
            tag(self, NO_DECAY, MAPPING_RATE, names=("repeat_emb",))

        # Trunk: patches in, the distinct blocks, norm, patches out.
        self.in_proj = tag(nn.Linear(model.channels * p * p, w, bias=False), NO_DECAY)
        self.blocks = nn.ModuleList(
            [TransformerBlock(w, d_ff, model.head_dim, model.dropout) for _ in range(sharing.depth)]
        )
        self.out_norm = RMSNorm(w)
        self.out_proj = tag(zero_init(nn.Linear(w, model.channels * p * p, bias=False)), NO_DECAY)

    def condition(self, c_noise, aug_cond=None, class_cond=None) -> torch.Tensor:
        """The mapping network's output for a batch: (N, 1, w)."""
        n = c_noise.shape[0]
        if aug_cond is None:
            aug_cond = c_noise.new_zeros([n, AUG_COND_DIM])
        m = self.time_in_proj(self.time_emb(c_noise[:, None])) + self.aug_in_proj(self.aug_emb(aug_cond))
        if self.class_emb is not None:
            if class_cond is None:
                raise ValueError(
                    f"class-conditional model: class_cond is required (use {self.num_classes} for 'no class')"
                )
            m = m + self.class_emb(class_cond)
        return self.mapping(m)[:, None, :]

    def repeat_conditions(self, cond: torch.Tensor) -> list[torch.Tensor]:
        """Conditioning per repeat index r: cond * repeat_multiplier(r), i.e. cond * (r + 1)
        [+ learned vector r]."""
        substeps = 1 + max(a.repeat for a in self.schedule)
        conds = [cond * repeat_multiplier(r) for r in range(substeps)]
        if self.repeat_emb is not None:
            conds = [c + self.repeat_emb[r].to(c.dtype) for r, c in enumerate(conds)]
        return conds

    def apply_block(self, application: Application, x, pos, conds) -> torch.Tensor:
        """One block application; recomputed in backward when checkpointing is on."""
        block, cond = self.blocks[application.block], conds[application.repeat]
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, pos, cond, use_reentrant=False)
        return block(x, pos, cond)

    def run_applications(self, tokens, pos, conds, start: int, stop: int) -> torch.Tensor:
        """Applications start..stop−1 of the schedule, in order: the one loop over blocks."""
        for application in self.schedule[start:stop]:
            tokens = self.apply_block(application, tokens, pos, conds)
        return tokens

    def run_routed(self, tokens, conds, routing: Routing) -> torch.Tensor:
        """TREAD: each route runs its applications on a random subset of every sample's tokens.

        The other tokens skip the route and re-enter unchanged after its end (scattered back into
        the full sequence saved at its start); RoPE positions follow the kept tokens.
        """
        done = 0
        for k, route in enumerate(routing.routes):
            if not done <= route.start <= route.end < len(self.schedule):
                raise ValueError(
                    f"route {route.start}..{route.end}: routes must be ordered, disjoint and "
                    f"within the {len(self.schedule)} block applications"
                )
            tokens = self.run_applications(tokens, self.pos, conds, done, route.start)  # (N, L, w)
            keep = routing.keep_index(k, tokens.shape[1]).to(tokens.device)  # (N, L')
            index = keep[..., None].expand(-1, -1, tokens.shape[-1])  # (N, L', w)
            kept = tokens.gather(1, index)  # (N, L', w)
            kept = self.run_applications(kept, self.pos[keep], conds, route.start, route.end + 1)
            tokens = tokens.scatter(1, index, kept)  # (N, L, w): routed tokens as they entered
            done = route.end + 1
        return self.run_applications(tokens, self.pos, conds, done, len(self.schedule))

    def run_cached(self, tokens, conds, cache: BlockCache) -> torch.Tensor:
        """Δ-DiT: a full evaluation stores output − input of the cached span; a cached one skips
        the span and adds that delta to its current input."""
        span, reuse = cache.next_evaluation(len(self.schedule))
        tokens = self.run_applications(tokens, self.pos, conds, 0, span.start)
        if reuse:
            tokens = cache.reuse(tokens)
        else:
            out = self.run_applications(tokens, self.pos, conds, span.start, span.stop)
            cache.store(out - tokens)
            tokens = out
        return self.run_applications(tokens, self.pos, conds, span.stop, len(self.schedule))

    def clamp_attention_scales_(self) -> None:
        """Cap every QK-norm temperature (the reference does it at each training forward)."""
        for block in self.blocks:
            block.attn.qk_norm.clamp_()

    def compile_blocks(self, **options) -> int:
        """Regional torch.compile: each distinct block once, reused by all its applications.

        Sharing makes this cheap (D2S8I compiles two blocks, not sixteen). A TREAD route changes the
        token count, so a block meets two sequence lengths and gets a graph for each (torch's automatic
        dynamic shapes). Returns the number of compiled regions.
        """
        for block in self.blocks:
            block.compile(**options)
        return len(self.blocks)

    def forward(
        self,
        x,
        c_noise,
        aug_cond=None,
        class_cond=None,
        routing: Routing | None = None,
        block_cache: BlockCache | None = None,
    ) -> torch.Tensor:
        # x: (N, C, H, W) already scaled by c_in; c_noise: (N,)
        # routing: TREAD routes, honoured in train() mode only; block_cache: Δ-DiT cache for sampling.
        if self.training:
            self.clamp_attention_scales_()  # outside the blocks, so compiled blocks mutate no parameter
        conds = self.repeat_conditions(self.condition(c_noise, aug_cond, class_cond))
        p = self.patch_size
        h_patches = x.shape[-2] // p
        tokens = rearrange(x, "n c (h i) (w j) -> n (h w) (c i j)", i=p, j=p)
        tokens = self.in_proj(tokens)  # (N, L, w)
        routing = routing if self.training else None  # evaluation and sampling see every token
        if routing is not None and block_cache is not None:
            raise ValueError("routing (training) and block_cache (sampling) cannot be combined")
        if routing is not None:
            tokens = self.run_routed(tokens, conds, routing)
        elif block_cache is not None:
            tokens = self.run_cached(tokens, conds, block_cache)
        else:
            tokens = self.run_applications(tokens, self.pos, conds, 0, len(self.schedule))
        tokens = self.out_proj(self.out_norm(tokens))  # (N, L, C·p·p)
        return rearrange(tokens, "n (h w) (c i j) -> n c (h i) (w j)", h=h_patches, i=p, j=p)


def build_model(model: ModelConfig, sharing: SharingConfig, device: str | torch.device | None = None):
    """Build the network; on the "meta" device no weights are allocated (for counting). A model that
    cannot fit on the device is refused before anything is allocated."""
    device = torch.device(device or "cpu")
    check_fits(model, sharing, device)
    with device:
        return ImageTransformer(model, sharing)


# --------------------------------------------------------------------------------------------
# Sizes from the configuration alone, so an impossible model is refused before it is built

# PyTorch's limit on one tensor's bytes: not even the "meta" device can describe more.
ADDRESSABLE_BYTES = 2**63
_BEYOND_PYTORCH = f"more than PyTorch can address ({ADDRESSABLE_BYTES // 2**60} EiB)"


def parameter_count(model: ModelConfig, sharing: SharingConfig) -> int:
    """The parameters of `ImageTransformer(model, sharing)` in closed form (spec §3.3), in Python ints."""
    w, f, n_heads = model.width, resolved_d_ff(model), model.width // model.head_dim
    patch = model.channels * model.patch_size**2
    attention = 5 * w * w + n_heads * (1 + 2 * (model.head_dim // 4))  # ada-norm, qkv, out; QK scale, RoPE
    feed_forward = w * w + 3 * w * f  # ada-norm, up (to 2 f), down
    mapping = model.mapping_layers * (w + 3 * w * f) + 2 * w  # RMSNorm + GEGLU per layer; in and out norms
    classes = (model.num_classes + 1) * w if model.num_classes else 0
    repeats = sharing.substeps * w if sharing.repeat_conditioning == "scale+embedding" else 0
    other = 2 * w * w + classes + repeats + 2 * patch * w + w  # time/aug projections, patches in/out, out norm
    return sharing.depth * (attention + feed_forward) + mapping + other


def buffer_count(model: ModelConfig) -> int:
    """Elements of the network's buffers: the two Fourier-feature matrices and the patch positions."""
    tokens = (model.image_size // model.patch_size) ** 2
    return model.width // 2 * (1 + AUG_COND_DIM) + 2 * tokens


def largest_activation(model: ModelConfig) -> int:
    """Elements of the largest tensor of a forward pass on one image: the attention scores (heads ×
    tokens²), the feed-forward hidden layer, the qkv projection or the patches."""
    tokens = (model.image_size // model.patch_size) ** 2
    widths = (
        model.width // model.head_dim * tokens,
        2 * resolved_d_ff(model),
        3 * model.width,
        model.channels * model.patch_size**2,
    )
    return tokens * max(widths)


def check_fits(
    model: ModelConfig, sharing: SharingConfig, device: torch.device, bytes_per_weight: int = 4, use: str = "in float32"
) -> None:
    """Raise a one-line UserError if `bytes_per_weight` per parameter and buffer element exceed the
    device's total memory (`hardware.memory_bytes`), or, where that is unknown (meta), PyTorch's limit;
    or if one image's forward pass needs a float32 tensor beyond PyTorch's limit."""
    activation = largest_activation(model)
    if 4 * activation > ADDRESSABLE_BYTES:
        raise UserError(
            f"model.image_size = {model.image_size} (model.patch_size = {model.patch_size}): "
            f"a forward pass on one image would need a tensor of {activation:.3g} elements, "
            f"{_BEYOND_PYTORCH}"
        )
    parameters = parameter_count(model, sharing)
    need = (parameters + buffer_count(model)) * bytes_per_weight
    have = hardware.memory_bytes(device)
    if need <= (have if have is not None else ADDRESSABLE_BYTES):
        return
    where = "this machine" if device.type == "cpu" else str(device)
    holder = _BEYOND_PYTORCH if have is None else f"{where} has {have / 2**30:.3g} GiB"
    raise UserError(
        f"{_size_settings(model, sharing)}: the model would have {parameters:.3g} parameters "
        f"({need / 2**30:.3g} GiB {use}); {holder}"
    )


def _size_settings(model: ModelConfig, sharing: SharingConfig) -> str:
    """The settings that make a model big, for a refusal: the patch grid where the positions outweigh
    the parameters, else the width and depth."""
    if 2 * (model.image_size // model.patch_size) ** 2 > parameter_count(model, sharing):
        return f"model.image_size = {model.image_size} (model.patch_size = {model.patch_size})"
    d_ff = f", model.d_ff = {model.d_ff}" if model.d_ff else ""
    return f"model.width = {model.width}{d_ff} (sharing.depth = {sharing.depth})"


def param_groups(net: nn.Module, lr: float, weight_decay: float, mapping_lr_scale: float):
    """The four AdamW groups of spec §1.8: (weight decay or not) x (mapping-rate or not).

    Decay: weights of the Linear layers inside the blocks and the mapping network.
    Mapping rate (lr * mapping_lr_scale): everything in the mapping network, every adaptive-norm
    projection (they read the mapping output) and the per-repeat embeddings.

    Read from the tags each module gave its parameters when it was built (DECAY or NO_DECAY, and
    MAPPING_RATE), never from module names. A parameter without exactly one of DECAY / NO_DECAY is
    a ValueError naming it, so a new layer cannot fall into a group unnoticed.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for module_name, module in net.named_modules():
        for name, param in module.named_parameters(recurse=False):
            tags = parameter_tags(module, name)
            if len(tags & {DECAY, NO_DECAY}) != 1:
                where = f"{module_name}.{name}" if module_name else name
                problem = "both DECAY and NO_DECAY" if {DECAY, NO_DECAY} <= tags else "no optimiser role"
                raise ValueError(
                    f"parameter {where} ({type(module).__name__}) has {problem}: tag it where "
                    "it is created (tdiff.model.tag) with DECAY or NO_DECAY, and MAPPING_RATE "
                    "if it reads or forms the conditioning"
                )
            decay, mapping = DECAY in tags, MAPPING_RATE in tags
            groups.setdefault((decay, mapping), []).append(param)
    return [
        {
            "params": params,
            "lr": lr * (mapping_lr_scale if mapping else 1.0),
            "weight_decay": weight_decay if decay else 0.0,
            "name": _group_name(decay, mapping),
        }
        for (decay, mapping), params in sorted(groups.items())
    ]


def _group_name(decay: bool, mapping: bool) -> str:
    return f"{'decay' if decay else 'no_decay'}{'_mapping' if mapping else ''}"
