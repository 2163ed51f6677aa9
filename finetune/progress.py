"""Progress bars for every long stage (tokenization, training, evaluation, merging), with one switch
for the whole process: ``--quiet`` (or ``set_quiet(True)``) turns them all off, including the bars
of Hugging Face libraries. Bars go to stderr, so a command's stdout stays parseable. Only the main
process of a multi-process launch draws bars.

    from finetune import progress
    with progress.bar(total=n, desc="eval", unit="batch") as b:
        ...; b.update(1)
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from finetune.environment import is_main_process

_quiet = False
_saved_env: dict = {}  # the user's own values of the switches we set

# Hugging Face libraries read these when they draw their own bars (downloads, datasets.map).
_HF_SWITCHES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar of this process off (True) or back on (False)."""
    global _quiet
    _quiet = bool(quiet)
    for name in _HF_SWITCHES:
        if quiet:
            _saved_env.setdefault(name, os.environ.get(name))
            os.environ[name] = "1"
        elif name in _saved_env:
            saved = _saved_env.pop(name)
            if saved is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = saved
    _switch_loaded_libraries(quiet)


def _switch_loaded_libraries(quiet: bool) -> None:
    """Libraries imported already have read the environment: switch their bars directly."""
    import sys
    import warnings

    with warnings.catch_warnings():  # huggingface_hub refuses (and warns) while its env switch is set
        warnings.simplefilter("ignore")
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

            (disable_progress_bars if quiet else enable_progress_bars)()
        if "transformers" in sys.modules:
            from transformers.utils import logging

            (logging.disable_progress_bar if quiet else logging.enable_progress_bar)()
        if "datasets" in sys.modules:
            import datasets

            (datasets.disable_progress_bars if quiet else datasets.enable_progress_bars)()


def is_quiet() -> bool:
    return _quiet


@contextmanager
def quiet_if(quiet: bool):
    """Silence bars inside the block when ``quiet``; restore the previous setting afterwards."""
    previous = _quiet
    if quiet:
        set_quiet(True)
    try:
        yield
    finally:
        if quiet:
            set_quiet(previous)


def bar(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False, **kwargs):
    """A tqdm bar (with ETA) on stderr, off when quiet, on non-main processes, or ``disable``."""
    from tqdm.auto import tqdm

    off = disable or _quiet or not is_main_process()
    return tqdm(total=total, desc=desc, unit=unit, disable=off, dynamic_ncols=True, **kwargs)
