"""The shell snippets of README.md and docs/*.md run, and exit 0.

Which blocks: every fenced code block whose info string is bash, sh, shell or console, and every plain
``` block whose first command starts with one of SHELL_WORDS (tdiff, python, pip, accelerate, ...).
In a console block only `$ ` lines are commands (the other lines are output); elsewhere every line is a
command except blank lines and `#` comments. A line ending in a backslash continues on the next.

Every command runs unless a marker says otherwise, and a command that exits non-zero fails the test: a
new snippet is covered by default, so it either works offline on the CPU in seconds or carries a marker.
Markers are HTML comments (GitHub does not render them), each on a line of its own, in the lines directly
above the block's opening fence (no blank line between), and each ends with its reason in parentheses:

    <!-- docs-test: skip (needs CIFAR-10 and a GPU) -->
        the whole block is not run.
    <!-- docs-test: skip "tdiff train --preset d2s8i --data cifar10" "tdiff eval RUN" (needs CIFAR-10) -->
        these commands of the block are not run. Each quoted string is one whole command, as the block
        writes it without its trailing `# comment` (compared word by word, after shell quoting, so a
        command holding a double quote is given in single quotes).
    <!-- docs-test: replace "--out runs/digits" with "--out runs/digits --steps 4" (700 steps: 2 minutes) -->
        every command of the block containing the first string runs with it replaced by the second.

A marker that matches nothing (the command it names was edited), an unknown marker, a marker without a
reason, or one that is not directly above a shell block fails the test too.

How they run: one test per file, its commands in order in one empty temporary folder (so `tdiff sample
runs/digits` finds the run an earlier `tdiff train --out runs/digits` of the same file made), with the
repository's bench/ linked into it (the docs run `python bench/...` from the repository root). A simple
`tdiff ARGS` command (no pipe, redirection, `;`, `&&` or `$`) runs in this process through tdiff.cli.main,
which is all the `tdiff` script runs, with ARGS as bash expands them (quotes, globs such as runs/*, ~): this
spares each command the seconds of importing torch. Any other command runs in `bash -c`, with `python` and
`tdiff` on PATH meaning this interpreter, PYTHONPATH the repository and OMP_NUM_THREADS=1. In-process
commands run with one torch thread too (on a busy 2-core machine, spinning OpenMP threads slow tiny models).
Run with `-s` to see what ran and what was skipped, and why.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tdiff.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
SHELL_WORDS = {
    "tdiff",
    "python",
    "python3",
    "pip",
    "accelerate",
    "bash",
    "sh",
    "tensorboard",
    "sha256sum",
    "mkdir",
    "cp",
    "mv",
    "cd",
    "export",
    "curl",
    "wget",
    "git",
    "tar",
}
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")  # `PYTHONPATH=. bash bench/gpu.sh` starts a command too
FENCE = re.compile(r"^\s*```(.*)$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$")


class MarkupError(Exception):
    """A marker that cannot be read or applied."""


@dataclass
class Command:
    line: int  # 1-based line of the markdown file where the command starts
    text: str  # as written (continuation lines joined), trailing comment included
    run: str | None = None  # what runs, after any replacement; None when skipped
    skipped: str | None = None  # the reason, when skipped


@dataclass
class Block:
    line: int  # the opening fence's line
    lang: str
    commands: list[Command]
    skipped: str | None = None  # the reason, when the whole block is skipped
    markers: list[tuple[int, str]] = field(default_factory=list)


def words(command: str) -> list[str]:
    """A command as the shell splits it, its comment left out (how skip markers compare commands)."""
    return shlex.split(command, comments=True)


def split_marker(body: str, where: str) -> tuple[list[str], str]:
    """'VERB "ARG" ... (REASON)' -> ([VERB, ARG, ...], REASON); the reason may hold parentheses."""
    if not body.endswith(")"):
        raise MarkupError(f"{where}: a docs-test marker ends with its reason in parentheses: {body!r}")
    depth = 0
    for i in range(len(body) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(body[i], 0)
        if depth == 0:
            break
    head, reason = body[:i].strip(), body[i + 1 : -1].strip()
    if not reason or not head:
        raise MarkupError(f"{where}: a docs-test marker needs a verb and a reason: {body!r}")
    return shlex.split(head), reason


def block_commands(lines: list[str], first: int, lang: str) -> list[Command]:
    """The commands of a block's lines; `first` is the 1-based line of lines[0]."""
    commands: list[Command] = []
    pending: Command | None = None
    for number, raw in enumerate(lines, first):
        text = raw.strip()
        if pending is not None:  # a continuation of the previous line
            pending.text = pending.text[:-1].rstrip() + " " + (text[2:] if text.startswith("> ") else text)
        elif lang == "console":
            if not text.startswith("$ "):
                continue  # output
            pending = Command(number, text[2:].strip())
            commands.append(pending)
        elif text and not text.startswith("#"):
            pending = Command(number, text)
            commands.append(pending)
        if pending is not None and not pending.text.endswith("\\"):
            pending = None
    return commands


def shell_blocks(markdown: str, name: str) -> list[Block]:
    """The shell blocks of a markdown text, their markers applied."""
    lines = markdown.splitlines()
    blocks: list[Block] = []
    markers: list[tuple[int, str]] = []  # the marker lines directly above the current line
    stray: list[int] = []
    i = 0
    while i < len(lines):
        line, number = lines[i], i + 1
        if "docs-test:" in line:
            match = MARKER.match(line)
            if not match:
                raise MarkupError(f"{name}:{number}: a docs-test marker is one whole line <!-- docs-test: ... -->")
            markers.append((number, match.group(1)))
            i += 1
            continue
        fence = FENCE.match(line)
        if not fence:
            stray += [n for n, _ in markers]
            markers = []
            i += 1
            continue
        info = fence.group(1).strip()
        end = i + 1
        while end < len(lines) and not FENCE.match(lines[end]):
            end += 1
        lang = info.split()[0].lower() if info else ""
        commands = block_commands(lines[i + 1 : end], number + 1, lang)
        first_word = commands[0].text.split()[0] if commands else ""
        plain_shell = not lang and (first_word in SHELL_WORDS or ASSIGNMENT.match(first_word))
        if lang in SHELL_LANGS or plain_shell:
            blocks.append(apply_markers(Block(number, lang, commands, markers=markers), name))
        else:
            stray += [n for n, _ in markers]
        markers = []
        i = end + 1
    stray += [n for n, _ in markers]
    if stray:
        raise MarkupError(f"{name}: docs-test marker(s) on line(s) {stray} are not directly above a shell block")
    return blocks


def apply_markers(block: Block, name: str) -> Block:
    for number, body in block.markers:
        where = f"{name}:{number}"
        args, reason = split_marker(body, where)
        verb, args = args[0], args[1:]
        if verb == "skip" and not args:
            block.skipped = reason
        elif verb == "skip":
            for wanted in args:
                hits = [c for c in block.commands if words(c.text) == words(wanted)]
                if not hits:
                    raise MarkupError(f"{where}: no command of the block below is {wanted!r}")
                for command in hits:
                    command.skipped = reason
        elif verb == "replace" and len(args) == 3 and args[1] == "with":
            old, new = args[0], args[2]
            hits = [c for c in block.commands if old in c.text and not c.skipped]
            if not hits:
                raise MarkupError(f"{where}: no command of the block below contains {old!r}")
            for command in hits:
                command.run = (command.run or command.text).replace(old, new)
        else:
            raise MarkupError(f"{where}: unknown docs-test marker {body!r} (see tests/test_docs.py)")
    for command in block.commands:
        if block.skipped:
            command.skipped = block.skipped
        if command.skipped:
            command.run = None
        elif command.run is None:
            command.run = command.text
    return block


# ------------------------------------------------------------------------------------------------
# Running


def in_process_args(command: str, work: Path) -> list[str] | None:
    """The argv of a simple `tdiff ...` command, as bash expands it in `work`; None for anything else."""
    if not (command.startswith("tdiff ") or command == "tdiff") or "$" in command or "`" in command:
        return None
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    if any(token and set(token) <= set("();<>|&") for token in lexer):
        return None
    script = f"set -- {command[len('tdiff') :]}\nfor a; do printf '%s\\0' \"$a\"; done"
    result = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True, check=True)
    return result.stdout.split("\0")[:-1]


def shims(folder: Path) -> Path:
    """A folder of `python`, `python3` and `tdiff` commands that run this interpreter."""
    folder.mkdir()
    for name, command in (("python", ""), ("python3", ""), ("tdiff", " -m tdiff")):
        shim = folder / name
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)}{command} "$@"\n')
        shim.chmod(0o755)
    return folder


@pytest.fixture
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_shell_snippets_run(doc, tmp_path, capsys, monkeypatch, one_torch_thread):
    name = str(doc.relative_to(ROOT))
    blocks = shell_blocks(doc.read_text(), name)
    work = tmp_path / "work"
    work.mkdir()
    (work / "bench").symlink_to(ROOT / "bench")
    env = {
        **os.environ,
        "PATH": f"{shims(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf"),
    }
    monkeypatch.chdir(work)
    report, ran = [], 0
    for block in blocks:
        for command in block.commands:
            where = f"{name}:{command.line}"
            if command.run is None:
                report.append(f"{where}: skipped ({command.skipped}): {command.text}")
                continue
            started = time.perf_counter()
            argv = in_process_args(command.run, work)
            if argv is not None:
                code = main(argv)
                out, err = capsys.readouterr()
            else:
                result = subprocess.run(
                    ["bash", "-o", "pipefail", "-c", command.run],
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                code, out, err = result.returncode, result.stdout, result.stderr
            ran += 1
            edited = " (edited by a marker)" if command.run != command.text else ""
            report.append(f"{where}: ran in {time.perf_counter() - started:.1f}s{edited}: {command.run}")
            assert code == 0, (
                f"{where}: `{command.run}` exited {code}; fix the snippet, or mark it (see "
                f"tests/test_docs.py)\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
            )
    with capsys.disabled():
        print(f"\n{name}: {len(blocks)} shell block(s), {ran} command(s) run, {len(report) - ran} skipped")
        print("\n".join("    " + line for line in report))


# ------------------------------------------------------------------------------------------------
# The markers themselves


EXAMPLE = """\
Text.

<!-- docs-test: skip "tdiff train --data cifar10 --set 'x=[1, 2]'" (needs CIFAR-10 (and a GPU)) -->
<!-- docs-test: replace "--out runs/a" with "--out runs/a --steps 2" (fast) -->
```bash
# a comment
tdiff train --data cifar10 --set 'x=[1, 2]'   # trailing
tdiff train --preset digits --data digits --out runs/a
python bench/x.py --a \\
    --b
```

```
error: not a shell block
```

<!-- docs-test: skip (output only) -->
```console
$ tdiff --help
Usage: tdiff ...
```

```
tdiff params --all
```

- an item:

  ```
  PYTHONPATH=. bash bench/gpu.sh
  ```
"""


def test_markers_skip_replace_and_attach_to_the_block_below():
    blocks = shell_blocks(EXAMPLE, "example.md")
    assert [(b.line, b.lang) for b in blocks] == [(5, "bash"), (18, "console"), (23, ""), (29, "")]
    first, console, plain, indented = blocks
    assert [c.line for c in first.commands] == [7, 8, 9]
    assert first.commands[0].run is None and first.commands[0].skipped == "needs CIFAR-10 (and a GPU)"
    assert first.commands[1].run == "tdiff train --preset digits --data digits --out runs/a --steps 2"
    assert first.commands[2].run == "python bench/x.py --a --b"
    assert [c.text for c in console.commands] == ["tdiff --help"] and console.commands[0].skipped == "output only"
    assert plain.commands[0].run == "tdiff params --all"
    assert indented.commands[0].run == "PYTHONPATH=. bash bench/gpu.sh"


@pytest.mark.parametrize(
    "markdown, message",
    [
        ("<!-- docs-test: skip (x) -->\n\n```bash\ntdiff --help\n```\n", "not directly above"),
        ("<!-- docs-test: skip (x) -->\n```\nerror: out\n```\n", "not directly above"),
        ("<!-- docs-test: skip -->\n```bash\ntdiff --help\n```\n", "reason in parentheses"),
        ("<!-- docs-test: ignore (x) -->\n```bash\ntdiff --help\n```\n", "unknown docs-test marker"),
        ('<!-- docs-test: skip "tdiff --version" (x) -->\n```bash\ntdiff --help\n```\n', "no command"),
        ('<!-- docs-test: replace "--a" with "--b" (x) -->\n```bash\ntdiff --help\n```\n', "contains '--a'"),
        ("text <!-- docs-test: skip (x) -->\n```bash\ntdiff --help\n```\n", "one whole line"),
    ],
)
def test_bad_markers_fail(markdown, message):
    with pytest.raises(MarkupError, match=re.escape(message)):
        shell_blocks(markdown, "bad.md")


def test_in_process_commands_are_expanded_by_bash(tmp_path):
    (tmp_path / "runs" / "b").mkdir(parents=True)
    (tmp_path / "runs" / "a").mkdir()
    assert in_process_args("tdiff compare runs/* --set 'train.betas=[0.9, 0.99]'  # x", tmp_path) == [
        "compare",
        "runs/a",
        "runs/b",
        "--set",
        "train.betas=[0.9, 0.99]",
    ]
    assert in_process_args("tdiff params --all | head", tmp_path) is None
    assert in_process_args("python bench/x.py", tmp_path) is None
