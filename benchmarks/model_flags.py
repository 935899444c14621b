"""The flags that pick the model and batch a benchmark times, shared by the benchmark scripts."""

import argparse


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Add `--preset`, `--resolution`, `--channels` and `--batch-size` (the `small` preset, 32x32 gray, batch 32)."""
    parser.add_argument("--preset", default="small")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
