"""Train a facediff DDPM: `accelerate launch train_accelerate.py [flags | config.yaml]`.

With no arguments, trains the main job: the `tiny` preset on scikit-learn's bundled handwritten digits. `--help`
lists the flags.
"""

import math
import sys

from facediff.allocator import keep_freed_memory
from facediff.stop_signals import TrainingInterrupted
from facediff.training import NonFiniteLossError, train
from facediff.training_args import parse_training_arguments


def main() -> int:
    keep_freed_memory()  # this process is ours: reuse freed tensor memory rather than fault in fresh pages each step
    try:
        result = train(parse_training_arguments())
    except TrainingInterrupted as stop:
        print(str(stop), file=sys.stderr)
        return stop.exit_code
    except (ValueError, OSError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # A run resumed at its last step trains no step, so it has no loss of its own to report.
    loss = f"final loss {result.final_loss:.4f}" if math.isfinite(result.final_loss) else "no step left to train"
    print(
        f"Trained {result.global_step} steps in {result.wall_time_s / 60:.1f} min, {loss}. "
        f"Pipeline: {result.output_dir}  samples: {result.output_dir / 'sample_grid.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
