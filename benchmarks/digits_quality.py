"""Are the samples of a digits model recognisable digits? A classifier trained on real digits says.

    python benchmarks/digits_quality.py facediff-output [--num-images 256] [--steps 1000 100 50] [--dtype bfloat16]

A logistic-regression classifier is fitted on 1,297 of scikit-learn's real 8x8 digits. Samples are box-downscaled to
8x8 and classified; a sample counts as recognisable when the classifier gives one digit probability >= 0.9. The
same figure for the 500 held-out real digits, sent through the same 8 -> 16 -> 8 pixel round trip as the training
images, is the ceiling. "digits seen" counts the classes among recognisable samples (10 means no mode collapse).
"""

import argparse
import time

import numpy as np
import torch
from model_flags import describe_cpu
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from facediff import FaceDiffPipeline
from facediff.data import to_pixels

CONFIDENT = 0.9


def to_features(images: list[Image.Image]) -> np.ndarray:
    """8x8 box-downscaled pixels in load_digits' 0..16 scale."""
    small = [np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float64) for image in images]
    return np.stack(small).reshape(len(images), 64) / 255.0 * 16.0


def score(classifier, features: np.ndarray) -> tuple[float, int]:
    probabilities = classifier.predict_proba(features)
    confident = probabilities.max(axis=1) >= CONFIDENT
    return float(confident.mean()), len(set(probabilities.argmax(axis=1)[confident]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a trained digits pipeline (folder or Hub id)")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 100])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="the UNet's (the chain stays float32)"
    )
    args = parser.parse_args()

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.data))
    train, held_out = order[:1297], order[1297:]
    classifier = LogisticRegression(max_iter=5000).fit(digits.data[train], digits.target[train])
    pipeline = FaceDiffPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype))
    pipeline.set_progress_bar_config(leave=False)
    resolution = pipeline.unet.config.sample_size
    real = [
        Image.fromarray(to_pixels(Image.fromarray(np.uint8(np.round(image / 16 * 255)), "L"), 1, resolution)[0])
        for image in digits.images[held_out]
    ]
    rows = [("real digits (held out)", *score(classifier, to_features(real)), "")]
    for steps in args.steps:
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(args.seed)
        images = pipeline(batch_size=args.num_images, generator=generator, num_inference_steps=steps).images
        elapsed = time.perf_counter() - started
        rows.append((f"samples, {steps} steps", *score(classifier, to_features(images)), f"{elapsed:.0f} s"))

    print(f"{describe_cpu()}; UNet in {args.dtype}")
    print(f"| images | recognisable (p >= {CONFIDENT}) | digits seen | sampling time |")
    print("|---|---:|---:|---:|")
    for name, share, classes, elapsed in rows:
        print(f"| {name} | {share:.1%} | {classes} | {elapsed} |")


if __name__ == "__main__":
    main()
