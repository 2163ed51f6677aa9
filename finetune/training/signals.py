"""SIGINT / SIGTERM during training: finish the current optimizer step, save a checkpoint, stop.

:class:`StopSignals` turns the first SIGINT or SIGTERM into a request that the training loop sees at
the next step boundary (every rank agrees on it, see ``finetune.training.distributed.any_rank``); a second
signal aborts at once. :class:`finetune.errors.RunInterrupted` is what the loop raises after saving: the CLI prints
its one-line message (where the checkpoint is, how to resume) and exits with 128 + the signal number.
"""

from __future__ import annotations

import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Install with ``install()``, remove with ``uninstall()``; ``received`` is the first signal
    (a ``signal.Signals``) or None. Outside the main thread it does nothing.

    ``escalate=False`` (processes started by torchrun): a second signal does not abort, because
    the launcher follows a Ctrl-C with its own SIGTERM to every process; it sends SIGKILL after a
    grace period anyway."""

    def __init__(self, escalate: bool = True):
        self.received: signal.Signals | None = None
        self._previous: dict = {}
        self._abort = False
        self.escalate = escalate

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def abort_on_next(self) -> None:
        """From now on a signal stops at once (KeyboardInterrupt): no step boundary is coming."""
        self._abort = True

    def _handle(self, signum, frame) -> None:
        if (self.received is not None and self.escalate) or self._abort:  # a second signal, or past the loop
            self.received = self.received or signal.Signals(signum)
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum)
