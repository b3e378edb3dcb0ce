"""ftjax.hostmem: the tuned glibc allocator that the entry points re-execute with."""
import os
import subprocess
import sys

import pytest

from ftjax import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc_only = pytest.mark.skipif(not hostmem._glibc(), reason="glibc tunables are Linux/glibc")

# Allocates, writes and frees a 256 MiB buffer 6 times (libc malloc/free in a thread) and prints the minor page
# faults of the last 5 rounds, after `reexec_tuned` had its chance to re-run the process.
PROBE = """
import ctypes, os, resource, sys, threading
sys.path.insert(0, {root!r})
from ftjax import hostmem
hostmem.reexec_tuned()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch():  # as XLA's temp buffer: malloc'd by a worker thread, written, freed
    def work():
        p = libc.malloc(2**28); ctypes.memset(p, 1, 2**28); libc.free(p)
    t = threading.Thread(target=work); t.start(); t.join()
touch()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    touch()
f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(hostmem.active(), os.environ.get(hostmem.MARK, ""), f1 - f0, sys.argv[1:])
"""


def run_probe(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.MARK)}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=ROOT), "a", "--b=1"],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    mode, mark, faults, args = out.stdout.split(" ", 3)
    return mode, mark, int(faults), args.strip()


def test_merged_tunables_keep_the_users_values():
    assert hostmem.merged_tunables(None).split(":") == [f"{k}={v}" for k, v in
                                                        hostmem.TUNED.items()]
    got = hostmem.merged_tunables("glibc.malloc.arena_max=4:glibc.pthread.rseq=0").split(":")
    assert got[:2] == ["glibc.malloc.arena_max=4", "glibc.pthread.rseq=0"]
    assert "glibc.malloc.arena_max=1" not in got and "glibc.malloc.mmap_max=0" in got


def test_bad_mode_is_a_clear_error():
    assert hostmem.mode({}) == "tuned" and hostmem.mode({hostmem.ENV: "System"}) == "system"
    with pytest.raises(ValueError, match="FTJAX_HOST_MALLOC='jemalloc'.*tuned, system"):
        hostmem.mode({hostmem.ENV: "jemalloc"})


@glibc_only
def test_reexec_keeps_arguments_and_stops_per_step_page_faults():
    mode, mark, tuned_faults, args = run_probe({})
    assert (mode, mark, args) == ("tuned", "1", "['a', '--b=1']")
    smode, smark, system_faults, _ = run_probe({hostmem.ENV: "system"})
    assert (smode, smark) == ("system", "")
    # glibc's default maps and unmaps the buffer each round: every page faults again (65,536
    # per 256 MiB round at 4 KiB); tuned, the heap (huge pages where the kernel allows) is reused.
    assert system_faults > 5 * 30_000
    assert tuned_faults < system_faults / 10
