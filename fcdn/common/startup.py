"""What every entry script does before TensorFlow is imported."""

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                    "MALLOC_ARENA_MAX")
KEPT_FREE_BYTES = 1 << 30
TOP_PAD_BYTES = 256 << 20


def quiet_tensorflow():
    """Keeps TensorFlow's C++ start-up notices (CPU features, absl, CUDA factories) out of the user's
    log: TF_CPP_MIN_LOG_LEVEL=2 hides its info and warning lines, errors still show. A value the
    user set wins (TF_CPP_MIN_LOG_LEVEL=0 shows everything)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def keep_freed_memory():
    """Lets glibc's malloc keep the memory TensorFlow frees, for its next step to reuse. Returns
    whether the setting was made.

    TensorFlow's CPU kernels allocate their large tensors afresh in every step. By default glibc
    serves each one with its own mmap and gives it back at once, so the next step touches brand-new
    pages and the kernel zero-fills every one (page faults, counted as system time): in a CPU
    training of FCDenseNet56 that was 40% of the CPU time, and the images per second rose from 1.6
    to 2.8 without it (bench/bench_kept_memory.py). Here large blocks come from the heap, and up to
    1 GiB freed at its top stays with the process. The cost: the process keeps its peak memory
    (3.6 GB instead of 2.4 GB in that run) instead of handing it back between steps.

    Left as it is where the C library is not glibc, or where the user set any MALLOC_ variable of
    their own (or preloads another allocator: glibc's settings then go unused)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in MALLOC_VARIABLES):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another C library: its own allocator
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(mallopt(parameter, value) == 1 for parameter, value in (
        (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEPT_FREE_BYTES), (M_TOP_PAD, TOP_PAD_BYTES)))
