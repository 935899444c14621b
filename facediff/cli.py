"""The `facediff` command: `facediff sample MODEL ...` draws images from a trained pipeline."""

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .pipelines import FaceDiffPipeline
from .sample_grids import save_grid

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sample(args: argparse.Namespace) -> Path:
    """
    Write `args.num_images` PNGs and a grid into `args.out`. Image i is drawn with its own generator seeded
    `seed + i`, so it is the same image whatever the batch size.

    Args:
        args (`argparse.Namespace`):
            `model`, `num_images`, `steps`, `seed`, `batch_size`, `out`, `device`, `dtype`.

    Returns:
        `Path`: the grid.
    """
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = FaceDiffPipeline.from_pretrained(args.model, torch_dtype=DTYPES[args.dtype]).to(device)
    pipeline.set_progress_bar_config(disable=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    with tqdm(total=args.num_images, desc=f"Sampling ({args.steps or 'all'} steps)", unit="image") as progress:
        for start in range(0, args.num_images, args.batch_size):
            indices = range(start, min(start + args.batch_size, args.num_images))
            generators = [torch.Generator(device="cpu").manual_seed(args.seed + index) for index in indices]
            batch = pipeline(batch_size=len(indices), generator=generators, num_inference_steps=args.steps).images
            for index, image in zip(indices, batch, strict=True):
                image.save(out / f"{index:05d}.png")
            images += batch
            progress.update(len(indices))
    return save_grid(images, out / "grid.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facediff", description="Sample from facediff DDPM pipelines.")
    commands = parser.add_subparsers(dest="command", required=True)
    sampler = commands.add_parser("sample", help="draw images from a trained pipeline")
    sampler.add_argument("model", help="a pipeline folder or a Hub repo id (user/name)")
    sampler.add_argument("--num-images", type=_positive, default=64)
    sampler.add_argument("--steps", type=_positive, default=None, help="respaced sampling steps; default: all T")
    sampler.add_argument("--seed", type=int, default=0)
    sampler.add_argument("--batch-size", type=_positive, default=16)
    sampler.add_argument("--out", default="samples", help="folder for the PNGs and grid.png")
    sampler.add_argument("--device", default=None, help="cpu, cuda, mps, ...; default: cuda when available")
    sampler.add_argument("--dtype", choices=list(DTYPES), default="float32")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        grid = sample(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"Wrote {args.num_images} images and {grid}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
