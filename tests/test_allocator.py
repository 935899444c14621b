"""`keep_freed_memory`: freed tensor memory is reused instead of being mapped afresh (glibc's page faults)."""

import platform
import subprocess
import sys

import pytest

# Allocates, fills and frees a 40 MiB tensor 10 times, after a first one, and prints the minor page faults that took.
# Above 32 MiB glibc always maps a fresh block by default: a batch of activations at higher resolution.
PROBE = """
import resource, sys, torch
from facediff.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.empty(10 << 20).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(10 << 20).fill_(1)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> tuple[str, int]:
    output = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = output.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_freed_tensor_memory_is_reused_without_page_faults():
    _, default_faults = page_faults("default")
    applied, kept_faults = page_faults("keep")
    assert applied == "True"
    pages_per_tensor = (40 << 20) // 4096
    assert default_faults >= 9 * pages_per_tensor  # each fresh block is faulted in and zeroed page by page
    assert kept_faults <= 2 * pages_per_tensor  # the heap grows once or twice, then its pages serve the rest
