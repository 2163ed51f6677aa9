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

jemalloc is told to keep the pages it frees (:func:`with_jemalloc`), so each step reuses the last
one's. Over many steps some runs' kept pages stop fitting the tensors asked for, and the process
grows a little every step while what is allocated stays the same; :class:`KeptMemoryWatch` hands
them back when that happens.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

from finetune.environment import allocator_in_use
from finetune.errors import UserError

CHOICES = ("auto", "jemalloc", "system")
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # freed pages kept for reuse (see with_jemalloc)
ALL_ARENAS = 4096  # jemalloc's MALLCTL_ARENAS_ALL: "arena.4096.purge" empties every arena
SETTLE_STEPS = 3  # the kept memory of the first steps is the run's own (the watch's baseline)
KEPT_MARGIN = 64 << 20  # bytes kept beyond the baseline before they are handed back


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


class KeptMemoryWatch:
    """Freed pages that jemalloc keeps but no longer reuses, handed back at a step boundary.

    jemalloc keeps every page it frees (:func:`with_jemalloc`). In some runs, and not in others of
    the same command, the kept pages gradually stop fitting what the steps ask for, and the process
    grows every step while the memory in use does not (measured: docs/benchmarks.md, "Where the
    memory goes").
    :meth:`start` hands back what loading the model, the tokenizer and the data left, before the
    steps. :meth:`check` runs after each optimizer step: it reads jemalloc's counters and, once the
    pages kept beyond what is allocated exceed those of the first :data:`SETTLE_STEPS` steps by
    :data:`KEPT_MARGIN`, hands all of them back. The next step faults back what it uses; a run that
    does not grow never pays for it."""

    def __init__(self, mallctl):
        self._mallctl = mallctl
        self.checks = 0
        self.baseline = 0
        self.handed_back = 0  # how many times the steps' kept pages were returned

    @classmethod
    def start(cls) -> KeptMemoryWatch | None:
        """A watch for this process, its freed pages handed back; None where it does not have
        jemalloc (with statistics)."""
        if allocator_in_use() != "jemalloc":
            return None
        mallctl = getattr(ctypes.CDLL(None), "mallctl", None)
        if mallctl is None:
            return None
        watch = cls(mallctl)
        try:
            watch.kept()
        except OSError:  # built without statistics
            return None
        watch.hand_back()
        return watch

    def hand_back(self) -> None:
        """Return every kept freed page of every arena to the system."""
        self._mallctl(f"arena.{ALL_ARENAS}.purge".encode(), None, None, None, ctypes.c_size_t(0))

    def _read(self, name: str) -> int:
        value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
        if self._mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)):
            raise OSError(f"jemalloc has no {name}")
        return value.value

    def kept(self) -> int:
        """Bytes jemalloc holds resident beyond those allocated: freed pages it keeps."""
        epoch, size = ctypes.c_uint64(1), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint64))
        self._mallctl(b"epoch", ctypes.byref(epoch), ctypes.byref(size), ctypes.byref(epoch), size)  # fresh counters
        return self._read("stats.resident") - self._read("stats.allocated")

    def check(self) -> bool:
        """After an optimizer step: True when the kept pages had grown and were handed back."""
        self.checks += 1
        kept = self.kept()
        if self.checks <= SETTLE_STEPS:
            self.baseline = max(self.baseline, kept)
            return False
        if kept <= self.baseline + KEPT_MARGIN:
            return False
        self.hand_back()
        self.handed_back += 1
        return True
