"""The flags that pick the model and batch a benchmark times, shared by the benchmark scripts."""

import argparse


def add_model_flags(
    parser: argparse.ArgumentParser, preset: str = "small", channels: int = 1, batch_size: int = 32
) -> None:
    """Add `--preset`, `--resolution`, `--channels` and `--batch-size` (default: `small`, 32x32 gray, batch 32)."""
    parser.add_argument("--preset", default=preset)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, default=channels)
    parser.add_argument("--batch-size", type=int, default=batch_size)
