"""The DDIM inversion round trip of a trained model: faces inverted to x_T and decoded back (the ends of an
interpolation), the error on [0, 1] against the faces as the model sees them, per step count and UNet precision.

    python benchmarks/inversion_round_trip.py MODEL IMAGE_FOLDER [--num-images 16] [--steps 25 50 100 250]
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facediff import FaceDiffInterpolationPipeline


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 250])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()

    paths = sorted(Path(args.images).glob("*.png"))
    # Evenly spread over the folder (Olivetti's are ten per person, in order), so that they are different people.
    chosen = [paths[index] for index in np.linspace(0, len(paths) - 1, args.num_images).round().astype(int)]
    images = [Image.open(path) for path in chosen]
    print(f"{len(images)} images of {args.images}, {chosen[0].name} ... {chosen[-1].name}")
    print("| UNet | steps | mean abs error | max abs error | 99th percentile | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype in args.dtypes:
        pipeline = FaceDiffInterpolationPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, dtype))
        pipeline.set_progress_bar_config(disable=True)
        faces = pipeline.preprocess(images) / 2 + 0.5
        for steps in args.steps:
            start = time.perf_counter()
            # Two at a time, as an interpolation inverts them: its 2 frames are the two ends decoded.
            decoded = torch.cat(
                [pipeline(image=images[i : i + 2], num_frames=2, num_inference_steps=steps, output_type="pt").images
                 for i in range(0, len(images), 2)]
            )  # fmt: skip
            errors = (decoded - faces).abs()
            seconds = time.perf_counter() - start
            print(
                f"| {dtype} | {steps} | {errors.mean():.4f} | {errors.max():.4f} | "
                f"{errors.flatten().quantile(0.99):.4f} | {seconds:.0f} |"
            )


if __name__ == "__main__":
    main()
