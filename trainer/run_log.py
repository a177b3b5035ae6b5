"""What rank 0 tells about a run: ``training.log`` in the run folder and the console.

``training.log`` holds timestamped text lines, and every job of a run (a resumed or requeued
one) appends to the same file::

    2025-01-31 14:02:11 started run demo_cpu: step 0/300, epoch 0, world size 2 x batch 64 ...
    2025-01-31 14:02:19 [step 10/300] epoch 0  loss 23.8412  lr 0.01  samples/s 312  eta 0:04:01
                        emb_norm 17.93  grad_norm 4.1
    2025-01-31 14:03:02 [eval step 100] val: accuracy 61.20% +- 2.11  best 61.20%  auc 0.6630
                        tar@far=1e-4 0.0000  tar@far=1e-3 0.0120
    2025-01-31 14:09:40 finished at step 300/300; checkpoint step-300; 300 steps in 441.2 s ...

(one line each, folded here). A resumed job's first line says so: ``resumed from step-N
(world size 2 -> 1, classifier re-sharded)``. The console gets the same lines: on a terminal
the step lines drive a progress bar instead, elsewhere (a Slurm log, a pipe) they are printed
as they are, with no carriage returns. Written with the standard ``logging`` module (logger
``facetrain.training``), so a caller may add handlers of its own.
"""

from __future__ import annotations

import datetime
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "LOG_FILE",
    "Pace",
    "RunLog",
    "eval_line",
    "format_eta",
    "format_rate",
    "run_counts",
    "step_line",
]

LOG_FILE = "training.log"
LOGGER_NAME = "facetrain.training"
# tqdm's own rate and ETA would count the start-up and the first evaluation: Pace's figures
# are in the postfix instead.
_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
_FORMAT = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


def format_rate(value: float) -> str:
    """Samples per second with three significant figures (0.412, 31.2, 312, 4120)."""
    if not math.isfinite(value):
        return "?"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (with days once past one: ``2 days, 3:04:05``); ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=round(seconds)))


class Pace:
    """Samples per second and time to the end of this job's training steps.

    The first step of a job pays for start-up (data workers, first allocations, kernel
    builds), so it is left out of every figure as soon as a later step can stand in for it:
    the first report of a job never reads 0 samples/s or an ETA of days. Samples per second
    count the steps' own time; the ETA counts wall time since the first step ended
    (evaluations and checkpoints included, as the rest of the run will have them too).
    ``seconds_before``: the training time of earlier jobs of the run (from the checkpoint);
    ``clock``: seconds, for tests (``time.perf_counter``).
    """

    def __init__(self, seconds_before: float = 0.0, clock: Callable[[], float] | None = None):
        self.seconds_before = seconds_before
        self.clock = clock or time.perf_counter
        self.start_step = 0
        self._started: float | None = None
        self._step_began = 0.0
        self._first_end: float | None = None
        self._first_time = math.nan  # the first step's own duration
        self._busy = 0.0  # seconds inside steps since the last report (first step aside)
        self._busy_steps = 0

    def start(self, step: int) -> None:
        """Right before this job's first step."""
        self.start_step = step
        self._started = self.clock()

    def step_started(self) -> None:
        self._step_began = self.clock()

    def step_done(self) -> None:
        now = self.clock()
        seconds = now - self._step_began
        if self._first_end is None:
            self._first_end = now
            self._first_time = seconds
        else:
            self._busy += seconds
            self._busy_steps += 1

    def report(self, step: int, total_steps: int, global_batch: int) -> tuple[float, float]:
        """(samples per second since the last report, seconds left) at ``step``."""
        if self._busy_steps:
            rate = self._busy_steps * global_batch / max(self._busy, 1e-9)
        else:  # only the first step so far
            rate = global_batch / max(self._first_time, 1e-9)
        self._busy, self._busy_steps = 0.0, 0
        after_first = step - self.start_step - 1
        if after_first > 0 and self._first_end is not None:
            per_step = (self.clock() - self._first_end) / after_first
        else:
            per_step = self._first_time
        return rate, per_step * (total_steps - step)

    def seconds(self) -> float:
        """Training time of this job so far (0 before its first step)."""
        return 0.0 if self._started is None else self.clock() - self._started

    def seconds_total(self) -> float:
        """Training time of the run: earlier jobs (to their last checkpoint) and this one."""
        return self.seconds_before + self.seconds()


def step_line(step: int, total: int, epoch: int, metrics: dict[str, float], eta: float) -> str:
    """One progress line from a step's metrics (``trainer.monitor.step_metrics`` keys)."""
    parts = [
        f"[step {step}/{total}] epoch {epoch}",
        f"loss {metrics['train/loss']:.4f}",
        f"lr {metrics['train/lr']:.5g}",
        f"samples/s {format_rate(metrics['train/samples_per_sec'])}",
        f"eta {format_eta(eta)}",
    ]
    if "train/embedding_norm_mean" in metrics:
        parts.append(f"emb_norm {metrics['train/embedding_norm_mean']:.4g}")
    if "train/grad_norm" in metrics:
        parts.append(f"grad_norm {metrics['train/grad_norm']:.4g}")
    if metrics.get("train/nonfinite_steps"):
        parts.append(f"nonfinite {metrics['train/nonfinite_steps']:.0f}")
    return "  ".join(parts)


def eval_line(step: int, name: str, res: dict[str, float]) -> str:
    """One verification set's results (``trainer.evaluate.evaluate_sets``) as a log line,
    with the best accuracy so far where the trainer tracks it."""
    parts = [
        f"[eval step {step}] {name}: accuracy {100 * res['accuracy']:.2f}% "
        f"+- {100 * res['accuracy_std']:.2f}"
    ]
    if "best_accuracy" in res:
        parts.append(f"best {100 * res['best_accuracy']:.2f}%")
    if "roc_auc" in res:
        parts.append(f"auc {res['roc_auc']:.4f}")
    for key in (k for k in res if k.startswith("tar_at_far_")):
        parts.append(f"tar@far={key.removeprefix('tar_at_far_')} {res[key]:.4f}")
    return "  ".join(parts)


def run_counts(train: dict[str, Any]) -> str:
    """This job's steps and training time; for a resumed run, the whole run's as well (the
    ``train`` part of the Trainer's summary)."""
    done, start, steps = train["steps_this_run"], train["start_step"], train["steps"]
    rate = format_rate(train["samples_per_sec"])
    if not start:
        return f"{done} steps in {train['seconds']:.1f} s ({rate} samples/s)"
    return (
        f"this run {done} steps ({start} -> {steps}) in {train['seconds']:.1f} s "
        f"({rate} samples/s); in all {steps} steps in {train['seconds_total']:.1f} s"
    )


class _BarHandler(logging.Handler):
    """Console lines on a terminal: written above the progress bar (``tqdm.write``)."""

    def __init__(self, log: RunLog) -> None:
        super().__init__()
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        if self.log.bar is None:
            self.log.stream.write(self.format(record) + "\n")
            self.log.stream.flush()
        else:
            self.log.bar.write(self.format(record), file=self.log.stream)


class RunLog:
    """``training.log`` (appended) and the console, on rank 0; silent elsewhere.

    ``progress``: show the step lines on the console (a bar on a terminal, the lines
    otherwise); messages (start, resume, evaluation, stop, end) always reach it.
    ``stream``: the console (``sys.stdout``); whether it is a terminal picks bar or lines.
    """

    def __init__(
        self, run_dir: Path, enabled: bool, progress: bool, stream: TextIO | None = None
    ) -> None:
        self.enabled = enabled
        self.progress = progress
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar: Any = None
        self.logger = logging.getLogger(LOGGER_NAME)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self._handlers: list[logging.Handler] = []
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
        if self.tty:
            console: logging.Handler = _BarHandler(self)
        else:
            console = logging.StreamHandler(self.stream)
        # On a terminal the bar shows the step lines; without `progress` none are shown.
        show_steps = progress and not self.tty
        console.addFilter(lambda record: show_steps or not getattr(record, "step_line", False))
        console.addFilter(lambda record: not getattr(record, "log_only", False))
        for handler in (to_file, console):
            handler.setFormatter(_FORMAT)
            self.logger.addHandler(handler)
            self._handlers.append(handler)

    def message(self, text: str, console: bool = True) -> None:
        """A line for the log and (``console``) the console."""
        if self.enabled:
            self.logger.info(text, extra={"log_only": not console})

    def start_bar(self, total_steps: int, step: int) -> None:
        """On a terminal with ``progress``: the bar, from ``step``, before the first step."""
        if self.enabled and self.progress and self.tty and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=step,
                desc="train",
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                mininterval=1.0,
                bar_format=_BAR_FORMAT,
            )

    def step(self, steps: int, line: str, **postfix: str) -> None:
        """``steps`` more steps done; ``line`` (see :func:`step_line`) goes to the log, and to
        the console as a line or as the bar's ``postfix``."""
        if not self.enabled:
            return
        self.logger.info(line, extra={"step_line": True})
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(steps)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        """The bar, then the handlers (the file is flushed and closed)."""
        self.close_bar()
        for handler in self._handlers:
            self.logger.removeHandler(handler)
            handler.close()
        self._handlers = []
