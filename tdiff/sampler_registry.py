"""Every sampler of tdiff and what is known about it, in one table that imports nothing heavy.

The functions themselves live in `tdiff.samplers` under the same names (`tdiff.samplers.SAMPLERS` is
built from this table and refuses to import if a name has no function). Everything else reads the
table: the configuration's allowed `sample.sampler` values, the CLI's `--sampler` choices and help,
which options a sampler takes (`tdiff.sample.sampler_options`), how many network evaluations n steps
cost (the Δ-DiT cache plan, `tdiff params`' sampling cost) and the table in docs/sampling.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    order: str  # the method's order of accuracy, as shown in the docs ("2", "2–3")
    evaluations_per_step: int  # network evaluations per step; 2 = Heun's correction (not after the last step)
    stochastic: str  # "no", "yes", or "when eta > 0"
    options: tuple[str, ...]  # the [sample] settings it takes besides the schedule: "eta", "solver_type"
    summary: str  # one line for the docs' table

    def evaluations(self, steps: int) -> int:
        """Network evaluations of a run of `steps` steps (2n − 1 for Heun: its last step is an Euler step)."""
        return steps if self.evaluations_per_step == 1 else self.evaluations_per_step * steps - 1

    @property
    def calls(self) -> str:
        """The docs' "model calls for n steps" cell."""
        return "n" if self.evaluations_per_step == 1 else f"{self.evaluations_per_step}n − 1"


REGISTRY: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec("euler", "1", 1, "no", (), "Euler on the probability-flow ODE"),
        SamplerSpec(
            "euler_ancestral",
            "1",
            1,
            "when eta > 0",
            ("eta",),
            "Euler to σ_down, then fresh noise of std σ_up (eta 1: the usual ancestral sampler)",
        ),
        SamplerSpec("heun", "2", 2, "no", (), "EDM's Heun (Alg. 1 of Karras et al. 2022)"),
        SamplerSpec("lms", "4", 1, "no", (), "linear multistep in σ (Adams–Bashforth on the last four derivatives)"),
        SamplerSpec("dpmpp_2m", "2", 1, "no", (), "DPM-Solver++(2M), multistep, deterministic"),
        SamplerSpec(
            "dpmpp_2m_sde",
            "2",
            1,
            "when eta > 0",
            ("eta", "solver_type"),
            "DPM-Solver++(2M) SDE; `sample.solver_type` midpoint or heun picks the correction",
        ),
        SamplerSpec("dpmpp_3m_sde", "2–3", 1, "when eta > 0", ("eta",), "DPM-Solver++(3M) SDE"),
        SamplerSpec("edm", "2", 2, "yes", (), "EDM's stochastic Heun (Alg. 2), churn 40, ImageNet-64 settings"),
    )
}
SAMPLER_NAMES = tuple(REGISTRY)
ETA_SAMPLERS = tuple(name for name, spec in REGISTRY.items() if "eta" in spec.options)


def markdown_table() -> str:
    """The samplers table of docs/sampling.md (a test keeps the two equal)."""
    rows = ["| `--sampler` | order | model calls for n steps | random | takes | what |", "|---|---|---|---|---|---|"]
    for spec in REGISTRY.values():
        takes = ", ".join(f"`{option}`" for option in spec.options) or "—"
        rows.append(f"| `{spec.name}` | {spec.order} | {spec.calls} | {spec.stochastic} | {takes} | {spec.summary} |")
    return "\n".join(rows)
