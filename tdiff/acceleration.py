"""Fewer block applications: TREAD token routes in training, a Δ-DiT block cache in sampling.

Both are small objects handed to `ImageTransformer.forward` as net kwargs (`routing=Routing(...)`,
`block_cache=BlockCache(plan)`), which `Denoiser`, the samplers and `sample_batch` pass through
untouched; the model's application loop reads them. See docs/acceleration.md for the measured
trade-offs.

Positions count block *applications* (the sequence `tdiff.sharing.block_schedule` returns), not
distinct blocks: in D2S8I (order 1212...) application 2 is block 1's second use, so a route or a
cached span may cover several repeats of the same shared block.

- TREAD (Krause et al. 2025, arXiv 2501.04765): per sample, a uniformly random fraction `rate` of
  the tokens skips applications start..end (end inclusive) and re-enters unchanged after `end`; the
  loss still covers every token. Training only: the model ignores routes outside `train()` mode.
- Δ-DiT (Chen et al. 2024, arXiv 2406.01125): a full evaluation stores output − input of a span of
  applications; a cached evaluation skips the span and adds the stored delta to its current input.
  The rear span is cached before a boundary evaluation (outline still forming at high σ), the front
  span from the boundary on; a full evaluation every `interval` refreshes the delta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdiff.config import RoutingConfig

# ------------------------------------------------------------------------------------------------
# TREAD routes (training)


@dataclass(frozen=True)
class Route:
    """One route: applications start..end (inclusive) run on a random subset of the tokens."""

    start: int  # first block application run on the kept tokens, 0-based
    end: int  # last one, inclusive
    rate: float  # fraction of the tokens that bypass start..end, in [0, 1)

    def kept(self, tokens: int) -> int:
        """Tokens that run through the route: L − int(L·rate), as TREAD's router."""
        return tokens - int(tokens * self.rate)


def routes_from_config(routing: RoutingConfig) -> tuple[Route, ...]:
    """The `[routing]` section as Route objects, ordered by start (config.py validated them)."""
    routes = (Route(s, e, r) for r, s, e in zip(routing.rates, routing.starts, routing.ends))
    return tuple(sorted(routes, key=lambda route: route.start))


def route_order(
    n: int, n_routes: int, tokens: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """(n, n_routes, tokens) long: an independent uniform permutation of 0..L−1 per sample and route.

    rand + argsort as TREAD draws it; drawn on the generator's device, then moved, so a CPU
    generator gives the same routes on any device.
    """
    draw_device = generator.device if generator is not None else device
    keys = torch.rand((n, n_routes, tokens), generator=generator, device=draw_device)
    return keys.argsort(dim=-1).to(device)


@dataclass(frozen=True)
class Routing:
    """The routes of one training forward pass and, per sample, which tokens each route keeps."""

    routes: tuple[Route, ...]  # ordered by start, non-overlapping
    order: torch.Tensor  # (N, n_routes, L) long: per sample and route, a permutation of the tokens

    @classmethod
    def draw(
        cls, routes: tuple[Route, ...], n: int, tokens: int, generator: torch.Generator | None = None, device=None
    ) -> Routing:
        return cls(routes, route_order(n, len(routes), tokens, generator, device))

    def keep_index(self, k: int, tokens: int) -> torch.Tensor:
        """(N, L') indices of the tokens that run route k: the first L' of its permutation.

        Sorted back into image order, so rate 0 keeps every token in place and the routed model
        is then exactly the plain one (attention itself does not depend on token order).
        """
        return self.order[:, k, : self.routes[k].kept(tokens)].sort(dim=-1).values


# ------------------------------------------------------------------------------------------------
# Δ-DiT block cache (sampling)


@dataclass(frozen=True)
class CachePlan:
    """Which block applications a sampling run replaces by a cached delta, and when.

    A "step" here is one network evaluation, counted from 0 in each run: for one-evaluation-per-step
    samplers (euler, dpmpp_2m, dpmpp_2m_sde, ...) that is the sampler step; heun and edm evaluate
    twice per step (2n − 1 in all), so their evaluation 2i is step i and 2i + 1 its correction.
    Classifier-free guidance is one evaluation on the doubled batch, so it does not change the count.
    """

    span: int  # applications cached (Δ-DiT's N_c): the last `span` before `boundary`, the first from it on
    boundary: int  # first evaluation of the late stage (front span cached); 0 = front from the start
    interval: int  # a full evaluation every `interval` per stage; 1 = never reuse (exactly uncached)

    @classmethod
    def default(
        cls,
        evaluations: int,
        applications: int,
        span: int | None = None,
        boundary: int | None = None,
        interval: int | None = None,
    ) -> CachePlan:
        """Defaults: a quarter of the applications, the boundary at 60% of the evaluations, interval 2.

        Δ-DiT's PIXART-α setting put the boundary at step 12 of 20; a quarter of a 16-application stack
        cached every other evaluation skips 12.5% of the applications.
        """
        return cls(
            span if span is not None else max(1, applications // 4),
            boundary if boundary is not None else round(0.6 * evaluations),
            interval if interval is not None else 2,
        )

    def check(self, applications: int) -> None:
        """Raise ValueError unless the plan fits a stack of `applications` block applications."""
        if not 1 <= self.span <= applications:
            raise ValueError(f"cache span {self.span} must be between 1 and the {applications} block applications")
        if self.boundary < 0 or self.interval < 1:
            raise ValueError(f"cache boundary {self.boundary} must be >= 0 and interval {self.interval} >= 1")

    def action(self, evaluation: int, applications: int) -> tuple[range, bool]:
        """(the cached span of applications, whether this evaluation reuses its stored delta).

        Each stage restarts the refresh rhythm, so its first evaluation is always full: the front
        span is never served a delta recorded for the rear one.
        """
        late = evaluation >= self.boundary
        span = range(0, self.span) if late else range(applications - self.span, applications)
        stage_start = self.boundary if late else 0
        return span, (evaluation - stage_start) % self.interval != 0


class BlockCache:
    """One sampling run's cache state: the stored delta, the evaluation counter, and totals.

    Pass it as `block_cache=BlockCache(plan)`; `sample_batch` calls `new_run()` before each batch,
    so every batch starts with a full evaluation. The totals add up over runs for the report.
    """

    def __init__(self, plan: CachePlan):
        self.plan = plan
        self.evaluation = 0  # network evaluations so far in this run
        self.delta: torch.Tensor | None = None  # (N, L, w) output − input of the span, last full evaluation
        self.evaluations = 0  # over all runs
        self.applications_run = 0
        self.applications_skipped = 0

    def new_run(self) -> None:
        """Forget the delta and restart the count: the next evaluation is a new run's first."""
        self.evaluation, self.delta = 0, None

    def next_evaluation(self, applications: int) -> tuple[range, bool]:
        """Advance by one evaluation; returns (span, reuse) and counts what will be skipped."""
        if self.evaluation == 0:
            self.plan.check(applications)
        span, reuse = self.plan.action(self.evaluation, applications)
        skipped = len(span) if reuse else 0
        self.evaluation += 1
        self.evaluations += 1
        self.applications_skipped += skipped
        self.applications_run += applications - skipped
        return span, reuse

    def store(self, delta: torch.Tensor) -> None:
        self.delta = delta

    def reuse(self, tokens: torch.Tensor) -> torch.Tensor:
        """The span's output approximated as its current input plus the stored delta."""
        if self.delta is None or self.delta.shape != tokens.shape:
            raise RuntimeError(
                "block cache: no delta stored for this batch; call new_run() at the start of every sampling run"
            )
        return tokens + self.delta

    @property
    def skipped_fraction(self) -> float:
        total = self.applications_run + self.applications_skipped
        return self.applications_skipped / total if total else 0.0

    def report(self) -> dict:
        """Totals over all runs, JSON-able: evaluations, applications run and skipped, the plan."""
        return {
            "evaluations": self.evaluations,
            "applications_run": self.applications_run,
            "applications_skipped": self.applications_skipped,
            "skipped_fraction": self.skipped_fraction,
            "span": self.plan.span,
            "boundary": self.plan.boundary,
            "interval": self.plan.interval,
        }
