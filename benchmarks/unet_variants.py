"""Training-step time of `small`-preset variants (width, depth, attention), and their configs for training runs.

    python benchmarks/unet_variants.py [--dtype bfloat16|float32] [--variants small w48 ...]
    python benchmarks/unet_variants.py --write-configs DIR   # DIR/<variant>/config.json for training

One step is facediff's loss (`facediff.training._diffusion_loss`), backward and AdamW on a fixed batch of 32 gray
32x32 images, the forward under bfloat16 autocast or in float32; the median of 12 steps after 4 warm-up steps. The
`small` row is the stock preset the others are compared with. The table of docs/recipes.md ("Wider and deeper
32-px UNets") is this script's output; its float32 column was run with `ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2` (AVX-512 and AMX switched off).
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel
from model_flags import describe_cpu

from facediff import FaceDiffScheduler
from facediff.training import _diffusion_loss
from facediff.training_args import TrainingArguments
from facediff.unet_presets import unet_config


def variant(base: int, multipliers: tuple[int, ...], layers: int = 1, attention_levels: tuple[int, ...] = ()) -> dict:
    """The `small` preset's 32x32 gray config with other channels per level, blocks per level and attention."""
    down = tuple("AttnDownBlock2D" if level in attention_levels else "DownBlock2D" for level in range(len(multipliers)))
    return {
        **unet_config("small", 32, 1),
        "block_out_channels": tuple(base * multiplier for multiplier in multipliers),
        "layers_per_block": layers,
        "down_block_types": down,
        "up_block_types": tuple(block.replace("Down", "Up") for block in reversed(down)),
    }


VARIANTS = {
    "small": variant(32, (1, 2, 2, 2)),
    "w24": variant(24, (1, 2, 2, 2)),
    "shallow3": variant(32, (1, 2, 2)),
    "attn8": variant(32, (1, 2, 2, 2), attention_levels=(2,)),
    "w32x": variant(32, (1, 2, 4, 4)),
    "w32xa8": variant(32, (1, 2, 4, 4), attention_levels=(2,)),
    "l2": variant(32, (1, 2, 2, 2), layers=2),
    "w48": variant(48, (1, 2, 2, 2)),
    "w64": variant(64, (1, 2, 2, 2)),
}


def step_seconds(config: dict, bf16: bool) -> float:
    torch.manual_seed(0)
    unet = UNet2DModel(**config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    scheduler, args = FaceDiffScheduler(), TrainingArguments(output_dir="unused", snr_gamma=0.0)
    pixels = torch.randint(0, 256, (32, 1, 32, 32), dtype=torch.uint8)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = _diffusion_loss(unet, scheduler, pixels, args)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(4):
        step()
    times = []
    for _ in range(12):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--write-configs", type=Path, default=None)
    args = parser.parse_args()
    if args.write_configs is not None:
        for name in args.variants:
            UNet2DModel.from_config(VARIANTS[name]).save_config(args.write_configs / name)
        print(f"Wrote {len(args.variants)} configs under {args.write_configs}")
        return

    print(f"{describe_cpu()}; {args.dtype} forward, batch 32, 32x32 gray")
    print("| variant | channels per level | blocks | attention | parameters | step | vs small |")
    print("|---|---|---:|---|---:|---:|---:|")
    baseline = None
    for name in args.variants:
        config = VARIANTS[name]
        seconds = step_seconds(config, args.dtype == "bfloat16")
        baseline = baseline or (seconds if name == "small" else None)
        parameters = sum(p.numel() for p in UNet2DModel(**config).parameters()) / 1e6
        attention = ", ".join(str(32 // 2**i) for i, b in enumerate(config["down_block_types"]) if "Attn" in b) or "-"
        ratio = f"{seconds / baseline:.2f}x" if baseline else ""
        print(
            f"| {name} | {', '.join(map(str, config['block_out_channels']))} | {config['layers_per_block']} | "
            f"{attention} | {parameters:.2f}M | {seconds * 1000:.0f} ms | {ratio} |"
        )


if __name__ == "__main__":
    main()
