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


def describe_cpu() -> str:
    """The CPU's model name and which of its flags decide the fast precision (AVX2, AVX-512, native bfloat16)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:  # not Linux
        pass
    shown = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if flag in flags]
    return f"{model} ({' '.join(shown) or 'flags unknown'})"
