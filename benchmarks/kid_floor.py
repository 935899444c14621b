"""How low can a model's pixel-PCA KID against its training images go? Three floors, from real images alone.

    python benchmarks/kid_floor.py --train_data_dir ../shared/datasets/olivetti-faces/train --resolution 32

- drawn from the reference: N real images drawn from the training set, scored against the whole set, as
  `stock_loop.py` and `quality_vs_time.py` compute their floor. The N images are in the reference too, so this is
  where a model that copies its training images lands, below any model that draws new faces.
- held out: N real images scored against the other training images (the reference without them): what a model
  that draws new faces of the same people, as unlike their training images as real photographs are, would score.
- held out, half of them mirrored: the same, with every other image flipped left to right: where a model trained
  with `--random_flip` lands when the images are not mirror-symmetric (faces lit from one side). Far above the
  held-out floor, it says to train without flips.

Mean and standard deviation over --repeats random draws of N images, with the same draws' high-frequency ratio
(their fine-detail energy over the reference's; see docs/evaluation.md): the band a model's grain or blur is judged
against.
"""

import argparse

import numpy as np
import torch
from model_flags import describe_cpu

from facediff import data
from facediff.evaluation import SampleEvaluator
from facediff.training_evaluation import training_reference


def training_pixels(train_data_dir: str, resolution: int) -> torch.Tensor:
    """The training images as a seed-0 run's evaluations compare with them: uint8 (N, C, H, W), at most
    `MAX_REFERENCE_IMAGES` (a seeded subset of a larger set)."""
    source = data.ImageSource(location=train_data_dir, is_image_folder=True, resolution=resolution)
    raw, column = data.load_raw_dataset(source)
    return training_reference(data.preprocess_images(raw, column, source, data.detect_channels(raw, column)), seed=0)


def floors(pixels: torch.Tensor, num_images: int, repeats: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and standard deviation of the three floors' pixel-PCA KID (`kid`) and high-frequency ratio
    (`high_frequency_ratio`) over `repeats` draws of `num_images` images."""
    whole = SampleEvaluator(pixels)
    rng = np.random.default_rng(0)
    scores = {"drawn from the reference": [], "held out of the reference": [], "held out, half of them mirrored": []}
    for _ in range(repeats):
        order = rng.permutation(len(pixels))
        chosen, rest = pixels[order[:num_images]], pixels[order[num_images:]]
        half_mirrored = chosen.clone()
        half_mirrored[::2] = half_mirrored[::2].flip(-1)
        held_out = SampleEvaluator(rest)
        scores["drawn from the reference"].append(whole.score(chosen))
        scores["held out of the reference"].append(held_out.score(chosen))
        scores["held out, half of them mirrored"].append(held_out.score(half_mirrored))
    return {
        name: {
            short: (float(np.mean([draw[key] for draw in draws])), float(np.std([draw[key] for draw in draws])))
            for short, key in (("kid", "pixel_pca_kid_mean"), ("high_frequency_ratio", "high_frequency_ratio"))
        }
        for name, draws in scores.items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_data_dir", required=True)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    pixels = training_pixels(args.train_data_dir, args.resolution)
    print(f"{describe_cpu()}; {args.num_images} real images at {args.resolution}px, {args.repeats} draws")
    print("| floor | pixel-PCA KID, mean ± std | mean + 2 std | high-frequency ratio, mean ± std |")
    print("|---|---:|---:|---:|")
    for name, floor in floors(pixels, args.num_images, args.repeats).items():
        (mean, std), (ratio, ratio_std) = floor["kid"], floor["high_frequency_ratio"]
        print(f"| {name} | {mean:.4f} ± {std:.4f} | {mean + 2 * std:.4f} | {ratio:.3f} ± {ratio_std:.3f} |")


if __name__ == "__main__":
    main()
