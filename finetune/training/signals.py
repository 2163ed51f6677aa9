"""SIGINT / SIGTERM at any moment of a run end it with one line saying what was kept.

:class:`StopSignals` has two modes. Deferred (training, saving): the first SIGINT or SIGTERM becomes a
request that the loop sees at the next step boundary (every rank agrees on it, see
``finetune.training.distributed.any_rank``) or once the weights are saved; a second signal aborts at
once. Abort (set-up, evaluation, merging: nothing would be lost by stopping): a signal raises
KeyboardInterrupt at once. Either way the loop ends with :class:`finetune.errors.RunInterrupted`, whose
message says what was kept and how to continue; the CLI prints it and exits with 128 + the signal.
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
        self._abort = True  # set-up: nothing to save yet
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
        """From now on a signal stops at once (KeyboardInterrupt): nothing needs finishing first."""
        self._abort = True

    def defer(self) -> None:
        """From now on the first signal is a request, seen at the next step boundary or save."""
        self._abort = False

    def _handle(self, signum, frame) -> None:
        if (self.received is not None and self.escalate) or self._abort:  # a second signal, or nothing to finish
            self.received = self.received or signal.Signals(signum)
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum)
