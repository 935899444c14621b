"""`keep_freed_memory`: freed tensor memory is reused instead of being mapped afresh (glibc's page faults)."""

import platform
import subprocess
import sys

import pytest

# A process of its own, as the setting is the whole process's and cannot be undone. It counts the minor page faults
# of allocating, filling and freeing a 40 MiB tensor 10 times, after a first one, with glibc's defaults and then with
# keep_freed_memory. Above 32 MiB glibc always maps a fresh block by default: a batch of activations at higher
# resolution.
PROBE = """
import resource, torch
from facediff.allocator import keep_freed_memory

def page_faults():
    torch.empty(10 << 20).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(10 << 20).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default_faults = page_faults()
applied = keep_freed_memory()
print(default_faults, applied, page_faults())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_freed_tensor_memory_is_reused_without_page_faults():
    output = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    default_faults, applied, kept_faults = output.split()
    assert applied == "True"
    pages_per_tensor = (40 << 20) // 4096
    assert int(default_faults) >= 9 * pages_per_tensor  # each fresh block is faulted in and zeroed page by page
    assert int(kept_faults) <= 2 * pages_per_tensor  # the heap grows once or twice, then its pages serve the rest


def test_the_training_script_keeps_freed_memory_before_it_trains(monkeypatch):
    # train_accelerate.py owns its process, as `facediff sample` does: the setting is worth a few percent a step.
    import train_accelerate

    calls = []
    monkeypatch.setattr(train_accelerate, "keep_freed_memory", lambda: calls.append("keep freed memory"))
    monkeypatch.setattr(train_accelerate, "parse_training_arguments", lambda: None)

    def train(args):
        calls.append("train")
        raise ValueError("stopped by the test")

    monkeypatch.setattr(train_accelerate, "train", train)
    assert train_accelerate.main() == 2
    assert calls == ["keep freed memory", "train"]
