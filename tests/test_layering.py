"""One-way imports among tdiff's modules, checked on the source with `ast` (style guide §2).

Tiers, top to bottom; a module may import only from tiers strictly below its own, never
sideways or upwards. Imports inside functions count too (cli imports its heavy modules lazily).
Modules listed here that do not exist yet are fine; a module that exists but is not listed
fails, so a new file has to be placed in the table. A sub-package (`tdiff/cli/`) is one entry: all
its files sit on its tier and may import each other; each is checked on its own, as `cli`
(its `__init__.py`) and `cli.<module>`.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tdiff"

TIERS = {
    "__main__": 9,  # `python -m tdiff`: only calls cli
    "cli": 8,  # the package tdiff/cli/: every tdiff/cli/*.py
    "train": 7,  # above evaluate: train.eval_every runs the paper's FID/KID protocol during training
    "tracking": 6,  # --log-with: accelerate's trackers mirroring metrics.jsonl, for train
    "evaluate": 6,
    "report": 6,
    "sample": 5,  # below train/evaluate, which draw demo grids and FID samples with it
    "step": 5,  # the optimiser step: train, report (`compare --measure`) and the benchmarks run it
    "pipeline": 5,  # positions -> augmented device batches, for train
    "run": 5,  # the run directory: train, eval and compare reach a run's files through it
    "checkpoint": 4,
    "data": 4,
    "model": 3,
    "diffusion": 3,
    "samplers": 3,
    "augment": 3,
    "ema": 3,
    "acceleration": 2,  # TREAD routes / block cache objects that the model's loop reads
    "sharing": 1,
    "config": 1,
    "plot": 1,
    "seeds": 1,
    "hardware": 1,  # plot: the matplotlib figure of `compare --plot`
    "errors": 0,
    "files": 0,  # files: the one atomic-write helper
    "sampler_registry": 0,  # what is known about each sampler, read by config, the CLI and the docs
}
PACKAGE_ROOT = "__init__"  # `from tdiff import __version__`: allowed anywhere, imports nothing
IMPORTS_NOTHING_FROM_TDIFF = {"sampler_registry", "sharing", "errors", "seeds", "hardware", "files", PACKAGE_ROOT}
CLI_ONLY = {"typer", "rich", "click"}


def modules() -> dict[str, Path]:
    """tdiff's modules by name: `train` for tdiff/train.py; in a sub-package, `cli` for
    tdiff/cli/__init__.py and `cli.params` for tdiff/cli/params.py."""
    found = {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        package = init.parent.name
        found[package] = init
        found.update({f"{package}.{p.stem}": p for p in sorted(init.parent.glob("*.py")) if p.stem != "__init__"})
    return found


def top(name: str) -> str:
    """The top-level tdiff module (or sub-package) a module name belongs to: `cli.params` -> `cli`."""
    return name.split(".")[0]


def in_subpackage(name: str) -> bool:
    return (PACKAGE / top(name)).is_dir()


def imports(source: str, package_modules=None, package: str = "tdiff") -> list[tuple[str, str, int]]:
    """(kind, name, line) per import: kind "tdiff" with the top-level tdiff module (a sub-package
    counts as one module), or "external" with the top-level package name. `package` is the dotted
    package the source lies in, against which relative imports are read."""
    package_modules = set(package_modules or {top(name) for name in modules()})
    found = []

    def tdiff_module(dotted: str, line: int):
        parts = dotted.split(".")
        found.append(("tdiff", parts[1] if len(parts) > 1 else PACKAGE_ROOT, line))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "tdiff" or alias.name.startswith("tdiff."):
                    tdiff_module(alias.name, node.lineno)
                else:
                    found.append(("external", alias.name.split(".")[0], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level > len(base):
                raise AssertionError(f"line {node.lineno}: relative import above the package")
            module = node.module or ""
            if node.level:  # `from . import x` / `from .x import y` / `from .. import x` in a sub-package
                module = ".".join(base[: len(base) - node.level + 1]) + (f".{module}" if module else "")
            if module == "tdiff":  # `from tdiff import checkpoint` names a module; `__version__` not
                for alias in node.names:
                    tdiff_module(f"tdiff.{alias.name}" if alias.name in package_modules else "tdiff", node.lineno)
            elif module.startswith("tdiff."):
                tdiff_module(module, node.lineno)
            else:
                found.append(("external", module.split(".")[0], node.lineno))
    return found


def source_package(name: str) -> str:
    return f"tdiff.{top(name)}" if in_subpackage(name) else "tdiff"


def tdiff_imports(name: str) -> list[tuple[str, int]]:
    return [
        (target, line)
        for kind, target, line in imports(modules()[name].read_text(), package=source_package(name))
        if kind == "tdiff"
    ]


# ------------------------------------------------------------------------------------------------


def test_the_import_reader_understands_every_form():
    source = """
import os, torch.nn
import tdiff.config
from tdiff import __version__
from tdiff import checkpoint as ckpt
from tdiff.model import build_model
from . import sharing
from .errors import UserError
def lazy():
    from tdiff.report import model_summary
"""
    got = imports(source, package_modules={"checkpoint", "sharing"})
    assert [(k, t) for k, t, _ in got if k == "external"] == [("external", "os"), ("external", "torch")]
    assert sorted(t for k, t, _ in got if k == "tdiff") == sorted(
        ["config", PACKAGE_ROOT, "checkpoint", "model", "sharing", "errors", "report"]
    )


def test_the_import_reader_understands_a_subpackage():
    source = """
from tdiff.cli import app
from tdiff.cli.training import RUN_OPTIONS_FILE
import tdiff.cli.params
from . import sampling
from .evaluation import eval_command
from .. import checkpoint
from ..errors import UserError
"""
    got = imports(source, package_modules={"checkpoint", "cli"}, package="tdiff.cli")
    assert [t for k, t, _ in got if k == "tdiff"] == ["cli"] * 5 + ["checkpoint", "errors"]
    with pytest.raises(AssertionError, match="above the package"):
        imports("from ... import x", package="tdiff.cli")
    assert modules()["cli"] == PACKAGE / "cli" / "__init__.py" and in_subpackage("cli.params")


def test_every_module_has_a_tier():
    unknown = {top(name) for name in modules()} - set(TIERS) - {PACKAGE_ROOT}
    assert not unknown, f"place {sorted(unknown)} in TIERS (tests/test_layering.py) and the style guide"


@pytest.mark.parametrize("name", sorted(set(modules()) - {PACKAGE_ROOT}))
def test_imports_only_go_down(name):
    if top(name) not in TIERS:
        pytest.skip("not in TIERS; test_every_module_has_a_tier reports it")
    tier = TIERS[top(name)]
    own = top(name) if in_subpackage(name) else None  # a sub-package's modules may import each other
    wrong = [
        f"line {line}: tdiff.{name} (tier {tier}) imports tdiff.{target} (tier {TIERS.get(target, 'unknown')})"
        for target, line in tdiff_imports(name)
        if target not in (PACKAGE_ROOT, own) and (target not in TIERS or TIERS[target] >= tier)
    ]
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_cli_but_main():
    for name in modules():
        if name != "__main__" and top(name) != "cli":
            assert "cli" not in {t for t, _ in tdiff_imports(name)}, f"tdiff.{name} imports tdiff.cli"


@pytest.mark.parametrize("name", sorted(IMPORTS_NOTHING_FROM_TDIFF))
def test_leaf_modules_import_nothing_from_tdiff(name):
    if name not in modules():
        pytest.skip(f"tdiff/{name}.py does not exist yet")
    assert tdiff_imports(name) == []


def test_only_cli_imports_typer_rich_click():
    assert "cli.params" in modules(), "the cli package's modules are not found"
    for name, path in modules().items():
        if top(name) == "cli":
            continue
        ui = [
            (t, line)
            for kind, t, line in imports(path.read_text(), package=source_package(name))
            if kind == "external" and t in CLI_ONLY
        ]
        assert not ui, f"{path.relative_to(PACKAGE.parent)} imports {ui}: only tdiff/cli/ talks to the terminal"


def test_package_init_does_not_import_torch():
    externals = {t for kind, t, _ in imports(modules()[PACKAGE_ROOT].read_text()) if kind == "external"}
    assert "torch" not in externals


def test_importing_tdiff_and_its_cli_loads_no_torch():
    """`import tdiff` is cheap, and `tdiff --help` does not wait for torch (cli imports it lazily)."""
    code = (
        "import sys, tdiff; assert 'torch' not in sys.modules, 'tdiff'; "
        "import tdiff.cli; assert 'torch' not in sys.modules, 'tdiff.cli'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1:]
