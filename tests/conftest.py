"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags = (flags + " --xla_force_host_platform_device_count=8").strip()
# The suite's programs are tiny and each runs a few steps, so XLA's CPU backend spends far
# more time optimising them (LLVM) than running them: without those passes the train step of
# a tiny model compiles in 4.3 s instead of 10.7 s (measured 2026-12-08). Results stay within
# every test's tolerance; set FTJAX_TEST_XLA_OPT=1 to test with the optimised backend.
if os.environ.get("FTJAX_TEST_XLA_OPT", "0") != "1" and "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = flags

# One persistent compilation cache for the whole session, shared with the subprocesses the
# tests start (the CLI and multi-process tests): many modules compile the same tiny programs,
# and the per-module `jax.clear_caches()` below would otherwise make each compile them again
# (8-13% of the suite's time, measured on two subsets). A fresh directory per session, so
# nothing carries over between runs; set FTJAX_TEST_COMPILATION_CACHE=0 to run without it.
if os.environ.get("FTJAX_TEST_COMPILATION_CACHE", "1") != "0" \
        and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    _cache_dir = tempfile.mkdtemp(prefix="ftjax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import gc

import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled-program caches after every test module, so one process running
    the whole suite (~800 tests, thousands of compilations) does not keep growing."""
    yield
    import jax
    jax.clear_caches()
    gc.collect()
