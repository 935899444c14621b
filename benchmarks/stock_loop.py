"""The plain diffusers training loop that recipes are compared with, trained for a number of minutes.

    python benchmarks/stock_loop.py --train_data_dir DIR --resolution 32 --minutes 2.5 5 10 15 --out stock.jsonl
    python benchmarks/stock_loop.py --resolution 16 --model_preset tiny --no-random-flip --minutes 2.5 5 8 --out d.jsonl

What diffusers' examples/unconditional_image_generation/train_unconditional.py does, reduced to its loop: a
UNet2DModel (the `small` preset's config, or --model_preset, or --model_config_name_or_path), DDPMScheduler, AdamW at
1e-3 with its defaults for the rest, batch 32, random flips (not with --no-random-flip), an EMAModel
(train_unconditional.py's defaults: inv_gamma 1, power 3/4, max decay 0.9999) and DDPMPipeline to sample. It trains
on the images facediff's data layer prepares (the same pixels as a recipe's run; without --train_data_dir, the
built-in digits of the main job), on all of this machine's cores. At each mark of training time (the clock stops
while it evaluates), the EMA weights draw --num-images images at --steps respaced steps from a fixed seed, scored as
facediff's `--eval_steps` scores them (pixel-PCA FD and KID against the training images, at most 2,000 of them as a
seed-0 run draws them; memorised share); one JSON line per mark, after a first line with the floor: the pixel-PCA
KID of 10 random subsets of as many real images.
The first 16 samples of each mark go to a grid, OUT-<minutes>min.png beside OUT.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from model_flags import describe_cpu

from facediff import build_unet, data
from facediff.digits import digits_image_folder
from facediff.evaluation import SampleEvaluator
from facediff.sample_grids import save_grid
from facediff.training_evaluation import training_reference


def evaluate(unet, ema, evaluator, num_images: int, steps: int, seed: int, grid_path: Path) -> dict:
    """Score EMA samples drawn with DDPMPipeline, leaving the training weights as they were; the first 16 go to a
    grid PNG."""
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    unet.eval()
    try:
        pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(seed)
        images = pipeline(num_images, generator=generator, num_inference_steps=steps, output_type="np").images
    finally:
        unet.train()
        ema.restore(unet.parameters())
    samples = torch.from_numpy((images * 255).round().astype(np.uint8)).permute(0, 3, 1, 2).contiguous()
    save_grid(DDPMPipeline.numpy_to_pil(images[:16]), grid_path)
    return evaluator.score(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_data_dir", default=None, help="default: the built-in digits")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--model_preset", default="small")
    parser.add_argument("--model_config_name_or_path", default=None, help="default: --model_preset's config")
    parser.add_argument("--no-random-flip", action="store_true", help="for images a mirror changes, as digits")
    parser.add_argument("--minutes", type=float, nargs="+", default=[2.5, 5, 10, 15])
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="respaced sampling steps of each evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the JSON lines to write")
    args = parser.parse_args()

    train_data_dir = args.train_data_dir or str(digits_image_folder())
    source = data.ImageSource(location=train_data_dir, is_image_folder=True, resolution=args.resolution)
    raw, column = data.load_raw_dataset(source)
    channels = data.detect_channels(raw, column)
    train_dataset = data.preprocess_images(raw, column, source, channels)
    pixels = train_dataset[:][data.PIXELS].to(torch.uint8)
    reference = training_reference(train_dataset, seed=0)  # the images a seed-0 recipe run evaluates against
    evaluator = SampleEvaluator(reference)
    rng = np.random.default_rng(args.seed)
    floor = [
        evaluator.score(reference[rng.choice(len(reference), args.num_images, replace=False)])["pixel_pca_kid_mean"]
        for _ in range(10)
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "cpu": describe_cpu(),
        "real_subset_kid_mean": float(np.mean(floor)),
        "real_subset_kid_std": float(np.std(floor)),
    }
    print(json.dumps(header), flush=True)
    out.write_text(json.dumps(header) + "\n")

    torch.manual_seed(args.seed)
    if args.model_config_name_or_path is None:
        unet = build_unet(args.model_preset, args.resolution, channels)
    else:
        unet = UNet2DModel.from_config(UNet2DModel.load_config(args.model_config_name_or_path))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    loader = torch.utils.data.DataLoader(pixels, batch_size=32, shuffle=True, drop_last=True)

    marks = sorted(args.minutes)
    trained_seconds, step = 0.0, 0
    while marks:
        for batch in loader:
            started = time.perf_counter()
            clean = batch.float() / 127.5 - 1
            if not args.no_random_flip:
                clean = torch.where(torch.rand(len(clean))[:, None, None, None] < 0.5, clean.flip(-1), clean)
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, 1000, (len(clean),))
            loss = F.mse_loss(unet(scheduler.add_noise(clean, noise, timesteps), timesteps).sample, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            ema.step(unet.parameters())
            step += 1
            trained_seconds += time.perf_counter() - started
            if marks and trained_seconds >= marks[0] * 60:
                grid = out.with_name(f"{out.stem}-{marks[0]:g}min.png")
                scores = evaluate(unet, ema, evaluator, args.num_images, args.steps, args.seed, grid)
                row = {"minutes": marks.pop(0), "step": step, "loss": loss.item(), **scores}
                print(json.dumps(row), flush=True)
                with out.open("a") as lines:
                    lines.write(json.dumps(row) + "\n")
            if not marks:
                break


if __name__ == "__main__":
    main()
