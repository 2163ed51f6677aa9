"""The ways a command ends early, each caught by class in the CLI:

* :class:`UserError`: a mistake in the user's input (config, paths, data). One line, exit code 2,
  no traceback.
* :class:`TrainingError`: a run that cannot go on (e.g. a non-finite loss). One line, exit code 1.
* :class:`RunInterrupted`: a run stopped by a signal after saving a checkpoint. One line (where the
  checkpoint is, how to continue), exit code 128 + the signal number.

What is accepted but probably not meant gets one line too, on stderr: :func:`warn`.
"""


class UserError(Exception):
    """A mistake in the user's input (config, paths, data). The CLI prints it as one line and exits 2."""

    exit_code = 2


class TrainingError(Exception):
    """A run that cannot go on (e.g. a non-finite loss). Reported in one line, exit code 1."""

    exit_code = 1


class RunInterrupted(Exception):
    """The run stopped on a signal; ``phase``: what it was doing (set-up, training, saving,
    evaluation, merging). The message says what was kept and how to continue."""

    def __init__(self, message: str, signum: int, phase: str = "training"):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
        self.phase = phase


def warn(message: str) -> None:
    """A one-line warning on stderr, from the main process only: something was accepted, but
    probably not what was meant."""
    import sys

    from finetune.environment import is_main_process

    if is_main_process():
        print(f"finetune: warning: {message}", file=sys.stderr, flush=True)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its class name when the message is empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
