"""A clean stop asked of a training job: the ``StopFlag`` a stop signal (``launcher.lifeline``)
or ``train.stop_at_step`` raises, and the trainer reads before its first step and after each
one (it then saves a checkpoint if it trained since the last one, and returns)."""

from __future__ import annotations

import threading

__all__ = ["StopFlag"]


class StopFlag:
    """Raised from any thread (a signal thread, the training loop); read by the trainer."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str = "stop requested") -> None:
        self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()
