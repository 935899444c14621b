"""Runs train_accelerate.py once per kill point, each run SIGKILLed at its point, for tests/test_kill.py.

    python tests/kill_probe.py POINT:N [POINT:N ...] -- [training flags]

The run for POINT trains into the subfolder POINT of --output_dir and dies the N-th time it gets there, as if the
machine went away:
  step        inside the N-th loss computation (mid-step)
  checkpoint  after the N-th checkpoint's files are written, before it is renamed into place
  grid        after the N-th sample grid's PNG is written, before it is renamed into place
  final       halfway through moving the final pipeline into the output folder

Prints {POINT: exit code} as JSON, -9 for a run that SIGKILL ended. Each run is a child forked from this process, which
has imported the packages once (seconds each run would spend) and computed nothing: OpenMP does not survive a fork
once its threads have started.
"""

import json
import os
import runpy
import signal
import sys
import traceback
from pathlib import Path

from PIL import Image

import facediff.atomic_files as atomic_files
import facediff.checkpointing as checkpointing
import facediff.hub as hub
import facediff.training as training

TRAIN = str(Path(__file__).resolve().parents[1] / "train_accelerate.py")


def arm(point: str, nth: int) -> None:
    """Make this process SIGKILL itself the `nth` time it gets to `point`."""
    arrivals = 0

    def arrive():
        nonlocal arrivals
        arrivals += 1
        if arrivals == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    def then_arrive(original):
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            arrive()
            return result

        return wrapper

    if point == "step":
        training._diffusion_loss = then_arrive(training._diffusion_loss)
    elif point == "checkpoint":
        checkpointing._sync_to_disk = then_arrive(checkpointing._sync_to_disk)
    elif point == "grid":
        original_save = Image.Image.save

        def save_then_die(image, target, *args, **kwargs):
            original_save(image, target, *args, **kwargs)
            if str(target).endswith(".png.partial"):  # the grid's PNG is written; its rename never happens
                arrive()

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


def run_killed(point: str, nth: int, flags: list[str]) -> int:
    """Fork a child that trains with `flags` into the subfolder `point` of --output_dir and dies at `point`; its
    exit code."""
    pid = os.fork()
    if pid == 0:
        try:
            arm(point, nth)
            output_dir = Path(flags[flags.index("--output_dir") + 1]) / point
            sys.argv = [TRAIN, *flags, "--output_dir", str(output_dir)]
            runpy.run_path(TRAIN, run_name="__main__")
        except BaseException:
            traceback.print_exc()  # the run ended without reaching its kill point
        finally:
            os._exit(1)  # never back into the parent's loop
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


separator = sys.argv.index("--")
kill_points, training_flags = sys.argv[1:separator], sys.argv[separator + 1 :]
exit_codes = {}
for kill_point in kill_points:
    name, count = kill_point.split(":")
    exit_codes[name] = run_killed(name, int(count), training_flags)
print(json.dumps(exit_codes))
