"""A run's failure told in one line, however many processes it started.

A user error met after the ranks have started -- a corrupt record, a run whose weights went
non-finite, a checkpoint that cannot be written -- must stop every rank and show the one
sentence that names the file, key or config entry, not every rank's traceback wrapped in
torchrun's report. How the line travels:

- ``facetrain train`` gives its torchrun agent and the workers a file of its own
  (:data:`FAILURE_ENV`, in a fresh temporary folder).
- The first rank that fails with a user error (:func:`user_errors`) writes its line there
  (:func:`report`) and exits with :data:`EXIT_CODE`. A rank that fails after that -- a
  collective whose peer has gone -- exits with the same code and says nothing
  (:func:`told`); the agent stops the rest, as it does after any failed worker.
- The agent (:mod:`launcher.agent`) keeps torchrun's own report of a told failure to itself;
  the launcher prints the line and exits 2 (:func:`outcome`).
- A told failure is final: ranks that torchrun restarts after it (``dist.max_restarts``,
  an elastic job) end at once (:func:`launcher.worker.rank_main`), since a user error comes
  back on every restart.

Without the variable (a rank started by a torchrun or srun of the user's own) a failing rank
prints its line on stderr itself.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

FAILURE_ENV = "FACETRAIN_FAILURE_FILE"
EXIT_CODE = 2
"""What ``facetrain`` exits with for a user error (and a rank for a told failure)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors whose message is all the user needs (it names the key, file or argument):
    the project's input errors (every ``ValueError``: config, pack, RecordIO, .bin sets...),
    checkpoints that cannot be read or written, a training run that cannot go on."""
    from evaluation.onnx_export import OnnxParityError
    from launcher.submit import SubmitError
    from trainer.checkpoint import CheckpointError
    from trainer.step import TrainingError

    return (
        ValueError,
        OnnxParityError,
        CheckpointError,
        SubmitError,
        FileNotFoundError,
        TrainingError,
    )


def error_line(command: str, exc: BaseException) -> str:
    """``facetrain COMMAND: error: MESSAGE``."""
    return f"facetrain {command}: error: {exc}"


def tell(exc: BaseException, command: str = "train") -> bool:
    """Under a launcher's failure file: write ``exc``'s line there unless a rank of this run
    already has (a later error is the same failure seen from another rank). Returns whether
    the launcher will print a line (False: no launcher's file)."""
    path = os.environ.get(FAILURE_ENV)
    if not path:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return True
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(error_line(command, exc) + "\n")
    return True


def report(exc: BaseException, command: str = "train") -> int:
    """A rank's user error: told to the launcher (:func:`tell`), or else printed on stderr.
    Returns :data:`EXIT_CODE`."""
    if not tell(exc, command):
        print(error_line(command, exc), file=sys.stderr, flush=True)
    return EXIT_CODE


def told() -> bool:
    """Whether a rank of this run has already told its failure (then a later error of this
    process is its consequence: a collective's peer has gone)."""
    path = os.environ.get(FAILURE_ENV)
    return bool(path) and os.path.exists(path)


def new_failure_file() -> Path:
    """The path the ranks of one launch tell their failure in (not created yet)."""
    return Path(tempfile.mkdtemp(prefix="facetrain-")) / "failure"


def outcome(code: int, path: Path) -> int:
    """The launcher's exit status after its agent exited with ``code``: a told failure is
    printed as its one line and gives :data:`EXIT_CODE`. Removes ``path``'s folder."""
    try:
        line = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
    if code != 0 and line:
        print(line, file=sys.stderr, flush=True)
        return EXIT_CODE
    return code
