"""Is a model within the real-subset floor? Its pixel-PCA KID over several seed sets, beside the three floors.

    python benchmarks/kid_vs_floor.py olivetti-32 other-model \
        --train_data_dir ../shared/datasets/olivetti-faces/train --steps 1000 100 --sets 4

One 100-sample KID moves with the noise drawn by more than its printed ± (which covers the reference's subsets
only), so a model is scored as the floor is: --sets sets of --num-images samples (seeds --seed, --seed + N, ...),
each scored against the training images (a sample whose mirror image copies one counts as memorised, as for a model
trained with flips), and reported as mean ± std over the sets, with the sets' high-frequency ratio (grain above 1,
blur below; pixel-PCA KID hardly sees either), beside the floors of `kid_floor.py` (50 draws of as many real images:
drawn from the reference, held out of it, and held out with half of them mirrored). The samples are drawn in the
precision `facediff sample` picks (`--dtype auto`: bfloat16 where the CPU computes it natively).
"""

import argparse

import numpy as np
import torch
from kid_floor import floors, training_pixels
from model_flags import describe_cpu

from facediff import FaceDiffPipeline
from facediff.evaluation import SampleEvaluator
from facediff.precision import sampling_precision
from facediff.sample_grids import draw

SCORES = ("pixel_pca_kid_mean", "memorised_share", "high_frequency_ratio")


def score_sets(
    pipeline: FaceDiffPipeline,
    evaluator: SampleEvaluator,
    steps: int,
    sets: int,
    num_images: int,
    seed: int,
    low_noise_dtype: torch.dtype | None,
) -> dict[str, np.ndarray]:
    """Pixel-PCA KID, memorised share and high-frequency ratio of each of `sets` sets of `num_images` samples."""
    batches = draw(pipeline, sets * num_images, steps, seed, num_images, "pt", low_noise_dtype=low_noise_dtype)
    scores = [evaluator.score(images.mul(255).round().to(torch.uint8).cpu()) for _, images in batches]
    return {key: np.array([score[key] for score in scores]) for key in SCORES}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="pipeline folders")
    parser.add_argument("--train_data_dir", required=True)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000])
    parser.add_argument("--sets", type=int, default=4)
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--variance-type", choices=["fixed_large", "fixed_small"], default=None)
    parser.add_argument(
        "--clip-sample", action=argparse.BooleanOptionalAction, default=None, help="default: the saved scheduler's"
    )
    args = parser.parse_args()

    low_noise_dtype, reason = sampling_precision("cpu")
    pipelines = {model: FaceDiffPipeline.from_pretrained(model) for model in args.models}
    flags = {"variance_type": args.variance_type, "clip_sample": args.clip_sample}
    sampler = {name: value for name, value in flags.items() if value is not None}
    for pipeline in pipelines.values():
        pipeline.scheduler = pipeline.scheduler.from_config(pipeline.scheduler.config, **sampler)
    resolution = next(iter(pipelines.values())).unet.config.sample_size
    pixels = training_pixels(args.train_data_dir, resolution)
    evaluator = SampleEvaluator(pixels, count_mirrored_copies=True)
    rows = []
    for model, pipeline in pipelines.items():
        for steps in args.steps:
            rows.append(
                (
                    model,
                    steps,
                    score_sets(pipeline, evaluator, steps, args.sets, args.num_images, args.seed, low_noise_dtype),
                )
            )

    print(f"{describe_cpu()}; sampled in {reason}, {sampler or 'each saved scheduler as it is'}")
    print(f"{args.sets} sets of {args.num_images} samples (seeds from {args.seed}), against {len(pixels)} images")
    print("| | steps | pixel-PCA KID, mean ± std over sets | per set | memorised (max) | high-frequency ratio |")
    print("|---|---:|---:|---|---:|---:|")
    for name, floor in floors(pixels, args.num_images, 50).items():
        (mean, std), (ratio, ratio_std) = floor["kid"], floor["high_frequency_ratio"]
        print(
            f"| floor: {name} (mean + 2 std: {mean + 2 * std:.4f}) | | {mean:.4f} ± {std:.4f} | | | "
            f"{ratio:.3f} ± {ratio_std:.3f} |"
        )
    for model, steps, scores in rows:
        kids, ratios = scores["pixel_pca_kid_mean"], scores["high_frequency_ratio"]
        per_set = ", ".join(f"{kid:.4f}" for kid in kids)
        print(
            f"| {model} | {steps} | {kids.mean():.4f} ± {kids.std():.4f} | {per_set} | "
            f"{scores['memorised_share'].max():.1%} | {ratios.mean():.3f} ± {ratios.std():.3f} |"
        )


if __name__ == "__main__":
    main()
