"""torchrun's elastic agent as ``facetrain train`` starts it: ``python -m launcher.agent ARGS``
takes torchrun's arguments and runs torchrun's own ``main``.

The one difference: once a rank has told its failure (:mod:`launcher.failure`), torchrun's
report of it -- its log lines about the failed worker and the ones it stops, and the
``ChildFailedError`` summary with the agent's traceback -- is left out; the launcher prints
the rank's one line instead. Every other failure is reported as torchrun reports it.

It also dies with its launcher and passes SIGTERM / SIGUSR1 to the ranks instead of letting
torchrun act on them (:mod:`launcher.lifeline`).
"""

from __future__ import annotations

import logging
import sys

from launcher import failure
from launcher.lifeline import agent_lifeline


class _QuietAfterToldFailure(logging.Filter):
    """Drops torch.distributed's log records once a rank has told its failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("torch.distributed") and failure.told())


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torch logs through handlers of its own ("torch", "torch.distributed", ...; they do not
    # propagate), set up when it is imported: each gets the filter.
    loggers = [logging.getLogger()] + [
        logger
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and name.split(".")[0] == "torch"
    ]
    quiet = _QuietAfterToldFailure()
    for handler in {h for logger in loggers for h in logger.handlers} | {logging.lastResort}:
        if handler is not None:
            handler.addFilter(quiet)
    try:
        torchrun.main(sys.argv[1:] if argv is None else argv)
    except ChildFailedError:
        if failure.told():
            return failure.EXIT_CODE
        raise
    return 0


if __name__ == "__main__":
    # First of all: die with the launcher, and take the stop signals (launcher.lifeline).
    stop_signals = agent_lifeline()
    sys.exit(main())
