"""The two kinds of failure the CLI turns into exit codes.

`UserError`: the command or its inputs must change (bad preset, missing file, data absent offline).
The CLI prints its message as one line and exits 2.
`RunError`: the input was fine but the run failed (non-finite loss, disk full). Exit 1.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


class RunError(Exception):
    """A valid run that could not finish: the message says why and what was kept."""
