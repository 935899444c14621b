"""Runs train_accelerate.py and SIGKILLs it at a chosen moment, for tests/test_kill.py.

    python tests/kill_probe.py POINT N [training flags]

POINT is where the N-th time the process gets there it dies, as if the machine went away:
  step        inside the N-th loss computation (mid-step)
  checkpoint  after the N-th checkpoint's files are written, before it is renamed into place
  grid        after the N-th sample grid's PNG is written, before it is renamed into place
  final       halfway through moving the final pipeline into the output folder
"""

import os
import runpy
import signal
import sys
from pathlib import Path

from PIL import Image

import facediff.atomic_files as atomic_files
import facediff.checkpointing as checkpointing
import facediff.hub as hub
import facediff.training as training

point, nth = sys.argv[1], int(sys.argv[2])
sys.argv = [str(Path(__file__).resolve().parents[1] / "train_accelerate.py"), *sys.argv[3:]]
calls = 0


def die_on_nth(original, before=False):
    def wrapper(*args, **kwargs):
        global calls
        calls += 1
        if before and calls == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if not before and calls == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return wrapper


if point == "step":
    training._diffusion_loss = die_on_nth(training._diffusion_loss)
elif point == "checkpoint":
    checkpointing._sync_to_disk = die_on_nth(checkpointing._sync_to_disk)
elif point == "grid":
    original_save = Image.Image.save

    def save_then_die(image, target, *args, **kwargs):
        original_save(image, target, *args, **kwargs)
        if str(target).endswith(".png.partial"):  # the grid's PNG is written; its rename never happens
            die_on_nth(lambda: None)()

    Image.Image.save = save_then_die
elif point == "final":
    original_move = atomic_files.replace_entries

    def move_half(staging, target, last=None):
        entries = sorted(entry.name for entry in staging.iterdir())
        replace = os.replace

        def counting_replace(source, destination):
            replace(source, destination)
            if Path(destination).name == entries[len(entries) // 2]:
                os.kill(os.getpid(), signal.SIGKILL)

        atomic_files.os.replace = counting_replace
        original_move(staging, target, last)

    hub.replace_entries = move_half
else:
    raise SystemExit(f"unknown kill point {point}")

runpy.run_path(sys.argv[0], run_name="__main__")
