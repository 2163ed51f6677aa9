"""Runs `finetune train ARGS...` in this process with a SIGINT sent to itself in one phase of the run
(set-up, training, saving, evaluation, merging), as a user's Ctrl-C would arrive there:

    python tests/training/signal_driver.py PHASE train ARGS...
"""

import os
import signal
import sys


def interrupt():
    os.kill(os.getpid(), signal.SIGINT)


def before(fn):
    def wrapped(*args, **kwargs):
        interrupt()
        return fn(*args, **kwargs)
    return wrapped


def after(fn):
    def wrapped(*args, **kwargs):
        result = fn(*args, **kwargs)
        interrupt()
        return result
    return wrapped


def main(phase: str, argv: list[str]) -> None:
    import finetune.adapters
    import finetune.outputs.merge
    import finetune.tasks.memorize
    import finetune.training.loop as loop

    if phase == "set-up":
        loop.load_model = before(loop.load_model)
    elif phase == "training":
        real, calls = loop.accumulate_gradients, []

        def second_step(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                interrupt()
            return real(*args, **kwargs)

        loop.accumulate_gradients = second_step
    elif phase == "saving":
        finetune.adapters.save_adapter = before(finetune.adapters.save_adapter)
    elif phase == "evaluation":
        finetune.tasks.memorize.Task.evaluate = before(finetune.tasks.memorize.Task.evaluate)
    elif phase == "merging":  # after the weights are written into the merge's temporary folder
        finetune.outputs.merge.save_merged = after(finetune.outputs.merge.save_merged)
    sys.argv = ["finetune", *argv]
    from finetune.cli import main as cli

    cli()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
