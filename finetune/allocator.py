"""The process's malloc: which one it has, and jemalloc for ``finetune train`` where one is installed.

On Linux torch takes CPU tensors from the C library's malloc. glibc keeps the memory freed
activations leave in its heaps, cut into pieces that the next step's tensors often do not fit: on
the GSM8K throughput job that is ≈ 0.7 GB of a 3.0 GB peak resident set (docs/benchmarks.md,
"Where the memory goes"). jemalloc sorts allocations into size classes and holds much less. It
cannot be swapped in once a process runs (every library has already bound ``malloc``), so
``finetune train`` starts itself again, before it imports anything heavy, with jemalloc in
``LD_PRELOAD``. ``FINETUNE_ALLOCATOR`` chooses:

- ``auto`` (or unset): jemalloc when the dynamic linker can find one (Debian/Ubuntu package
  ``libjemalloc2``), else the C library's malloc;
- ``jemalloc``: jemalloc, and an error where none is installed;
- ``system``: the C library's malloc.

``environment.allocator_in_use()`` reads the allocator the process really has from its memory map;
run.json records it. Only Linux has ``LD_PRELOAD`` for this; elsewhere the system malloc is kept.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

from finetune.environment import allocator_in_use
from finetune.errors import UserError

CHOICES = ("auto", "jemalloc", "system")
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # freed pages kept for reuse (see with_jemalloc)


def choice(env=os.environ) -> str:
    value = env.get("FINETUNE_ALLOCATOR", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise UserError(f"FINETUNE_ALLOCATOR={env['FINETUNE_ALLOCATOR']!r} is not an allocator; "
                        f"use one of {', '.join(CHOICES)}")
    return value


def find_jemalloc() -> str | None:
    """The soname of an installed jemalloc (what ``LD_PRELOAD`` takes), or None."""
    return ctypes.util.find_library("jemalloc") if sys.platform.startswith("linux") else None


def preload_for(env=os.environ) -> str | None:
    """The library to preload for a training process, or None to keep this process as it is."""
    wanted = choice(env)
    if wanted == "system" or allocator_in_use() == "jemalloc":
        return None
    library = find_jemalloc()
    if library is None:
        if wanted == "jemalloc":
            raise UserError("FINETUNE_ALLOCATOR=jemalloc, but no jemalloc library was found "
                            "(Debian/Ubuntu: apt install libjemalloc2); use auto or system")
        return None
    if library in env.get("LD_PRELOAD", "").split():  # asked for already, and the linker did not load it
        if wanted == "jemalloc":
            raise UserError(f"FINETUNE_ALLOCATOR=jemalloc, but {library} in LD_PRELOAD was not loaded; "
                            "use auto or system")
        return None
    return library


def with_jemalloc(env, library: str) -> dict:
    """``env`` for a process that starts with ``library`` preloaded, and jemalloc told to keep the
    pages it frees for reuse (unless MALLOC_CONF says otherwise): its default hands them back to
    the system after 10 s, and taking them again cost ≈ 15 % of the GSM8K job's speed here."""
    return {**env, "LD_PRELOAD": " ".join(p for p in (library, env.get("LD_PRELOAD", "")) if p),
            "MALLOC_CONF": env.get("MALLOC_CONF") or JEMALLOC_CONF}


def restart_with_jemalloc() -> None:
    """Run this command again in this process (``exec``: same pid, arguments and environment) with
    jemalloc preloaded, when ``FINETUNE_ALLOCATOR`` asks for it and it is not loaded yet."""
    library = preload_for()
    if library is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, with_jemalloc(os.environ, library))
