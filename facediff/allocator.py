"""Let a CPU process reuse the memory of freed tensors instead of mapping fresh pages for every new one (glibc only).

Eager PyTorch on a CPU allocates each activation anew. glibc serves blocks above its mmap threshold with fresh `mmap`s
and hands freed heap memory back to the kernel above its trim threshold, so every UNet call maps new pages that the
kernel must fault in and zero: 8,000-15,000 page faults per forward pass of the `small` 32x32 UNet at batch 32.
Raising both thresholds, as `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...` would at
start-up, removes them; `python benchmarks/sample_speed.py --keep-freed-memory` and `benchmarks/train_throughput.py`
measure what it is worth. The process's resident memory then stays at its high-water mark instead of shrinking between
calls, and the peak grows only by fragmentation (about 10 MB of 530 when sampling, 10-20 MB of 900 in a training step).
"""

import ctypes
import ctypes.util
import platform

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Both must be raised: setting either one through mallopt turns off glibc's dynamic adjustment of the other, whose
# default (128 KiB) then maps or trims more often than before.
MMAP_THRESHOLD_BYTES = 1 << 30
TRIM_THRESHOLD_BYTES = (1 << 31) - 1


def keep_freed_memory() -> bool:
    """
    Make glibc keep freed memory for reuse in this process; a no-op on other C libraries (macOS, musl, Windows).

    It changes how fast memory is handed out, not what any computation gives. It applies to the whole process, so only
    entry points that own theirs (`train_accelerate.py`, `facediff sample` and `facediff eval`) call it.

    Returns:
        `bool`: whether glibc accepted both settings.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
