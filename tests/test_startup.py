"""Tests of fcdn/common/startup.py: what the entry scripts set before TensorFlow is imported."""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO_ROOT

pytestmark = [pytest.mark.slow,  # fresh interpreters: the allocator's settings are per process
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")]

# allocates, fills and frees 64 MiB through malloc, as a TensorFlow kernel's output is, then counts the
# page faults of doing it again
PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from fcdn.common.startup import keep_freed_memory
    made = keep_freed_memory() if sys.argv[1] == "tuned" else None
    libc = ctypes.CDLL("libc.so.6")
    libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: pages of 4 KiB, whatever the system's huge-page setting
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_void_p,)
    def allocate_fill_free(size):
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
    allocate_fill_free(64 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    allocate_fill_free(64 << 20)
    print(made, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")
PAGES = (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def probe(mode, **environment):
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60,
                            cwd=REPO_ROOT, env=dict(env, **environment))
    assert result.returncode == 0, result.stderr
    made, faults = result.stdout.split()
    return made, int(faults)


def test_freed_memory_is_reused_without_new_page_faults():
    made, faults = probe("tuned")
    assert made == "True" and faults < PAGES // 10, faults
    # glibc's default: a large block is mapped afresh and every page of it faults again
    _, untuned = probe("default")
    assert untuned > PAGES // 2, untuned


def test_a_malloc_setting_of_the_users_own_wins():
    made, faults = probe("tuned", MALLOC_ARENA_MAX="2")
    assert made == "False" and faults > PAGES // 2, faults
