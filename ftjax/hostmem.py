"""Host memory allocator settings for the CPU backend (Linux, glibc).

XLA:CPU allocates each executable's temporary buffer (hundreds of MiB for a training step) with
`malloc` every time the step runs and frees it afterwards. glibc serves an allocation that big
from a fresh `mmap` (always, from threads other than the main one) and returns it with `munmap`,
so every step first-touches all of it again: on `tiny` about 120,000 page faults per step, a
sixth of the step's CPU time (docs/performance.md, "Host memory"). PyTorch's CPU allocator has
the same behaviour.

`TUNED` makes glibc keep freed memory for reuse and back it with transparent huge pages:

    glibc.malloc.hugetlb=1          madvise(MADV_HUGEPAGE) on what malloc maps (2 MiB pages)
    glibc.malloc.arena_max=1        one arena, so XLA's worker threads share the reusable heap
    glibc.malloc.mmap_max=0         no per-allocation mmap: big buffers come from that heap
    glibc.malloc.trim_threshold=64G freed heap is kept, not returned to the system

The cost is resident memory: freed temporaries stay mapped, so a process's RSS stays near its
high-water mark (and can sit above it by fragmentation). Tunables are read when a process
starts, so `reexec_tuned()` re-runs the current command once with them set; the entry points
(`ftjax`, `scripts/benchmark.py`) call it first thing. `FTJAX_HOST_MALLOC=system` turns it off.
Nothing is changed off Linux or where glibc's tunables are not understood.
"""
from __future__ import annotations

import os
import platform
import sys

ENV = "FTJAX_HOST_MALLOC"          # "tuned" (default) | "system"
MARK = "FTJAX_HOST_MALLOC_APPLIED"  # set in the re-executed process
TUNED = {"glibc.malloc.hugetlb": "1", "glibc.malloc.arena_max": "1",
         "glibc.malloc.mmap_max": "0", "glibc.malloc.trim_threshold": str(64 * 2**30)}
MODES = ("tuned", "system")


def _glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def merged_tunables(existing: str | None) -> str:
    """GLIBC_TUNABLES with TUNED added; a key the user already set keeps the user's value."""
    pairs = [p for p in (existing or "").split(":") if p]
    have = {p.split("=", 1)[0] for p in pairs}
    pairs += [f"{k}={v}" for k, v in TUNED.items() if k not in have]
    return ":".join(pairs)


def mode(env: dict | None = None) -> str:
    """The requested mode from FTJAX_HOST_MALLOC (default "tuned"); a bad value is an error."""
    value = (os.environ if env is None else env).get(ENV, "tuned").strip().lower() or "tuned"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)} "
                         f"(system keeps glibc's defaults)")
    return value


def active() -> str:
    """What this process runs with: "tuned" when it was started with the tunables (by
    `reexec_tuned` or by hand), else "system"."""
    tun = os.environ.get("GLIBC_TUNABLES", "")
    return "tuned" if all(f"{k}=" in tun for k in TUNED) else "system"


def reexec_tuned(argv: list[str] | None = None) -> None:
    """Re-runs this process's command once with the tuned allocator, unless it is already set,
    FTJAX_HOST_MALLOC=system, or the platform is not Linux/glibc. Call it before importing
    jax (the re-run starts from scratch). Returns only when nothing is re-run."""
    if mode() == "system" or os.environ.get(MARK) or active() == "tuned" or not _glibc():
        return
    argv = list(getattr(sys, "orig_argv", []) or []) if argv is None else argv
    if not argv:
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = merged_tunables(env.get("GLIBC_TUNABLES"))
    env[MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + argv[1:], env)


def trim() -> bool:
    """Returns the free pages of the heap to the system (glibc `malloc_trim(0)`), keeping the
    address space. Call it after compiling, before the steps: the tuned allocator never trims
    by itself, so the compiler's freed working memory would otherwise stay resident next to the
    step's buffers. Returns False where there is no glibc."""
    if not _glibc():
        return False
    import ctypes
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False
