"""What an evaluation during training (`--eval_steps`) costs, against the training step it interrupts.

    python benchmarks/eval_cost.py [--preset small] [--resolution 32] [--channels 1] [--batch-size 64]
        [--num-images 64] [--inference-steps 25] [--num-reference 2000] [--reps 3] [--bf16]

Times, in one process with the machine's cores, as the training loop runs them: fitting the evaluator once
(`SampleEvaluator` on --num-reference images: the pixel PCA and the memorisation threshold), one evaluation
(`facediff.training_evaluation.sample_pixels` from the EMA weights in batches of --batch-size, then
`SampleEvaluator.score`), and one training step of --batch-size images (facediff's loss, backward, clipping, AdamW, the
EMA update). The reference images are random pixels: the fit's and the scores' arithmetic does not depend on what the
images show. Prints the medians over --reps repetitions and what an evaluation every N steps adds to training.
`--bf16` times them as a `--mixed_precision bf16` run does: the step under bf16 autocast, the evaluation on float32
weights with bfloat16 below t = T/2 (`low_noise_dtype`).
"""

import argparse
import contextlib
import statistics
import time

import torch
from model_flags import add_model_flags, describe_cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_flags(parser, batch_size=64)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--inference-steps", type=int, default=25)
    parser.add_argument("--num-reference", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="as a --mixed_precision bf16 run")
    args = parser.parse_args()

    from diffusers.training_utils import EMAModel

    from facediff import FaceDiffScheduler, build_unet
    from facediff.evaluation import SampleEvaluator
    from facediff.training import _diffusion_loss
    from facediff.training_args import TrainingArguments
    from facediff.training_evaluation import sample_pixels

    torch.manual_seed(0)
    shape = (args.channels, args.resolution, args.resolution)
    reference = torch.randint(0, 256, (args.num_reference, *shape), dtype=torch.uint8)
    unet = build_unet(args.preset, args.resolution, args.channels)
    scheduler = FaceDiffScheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75, foreach=True)
    pixels = torch.randint(0, 256, (args.batch_size, *shape), dtype=torch.uint8)
    training_args = TrainingArguments(output_dir="unused", snr_gamma=0.0)

    def fit():
        return SampleEvaluator(reference, inception=None)

    low_noise_dtype = torch.bfloat16 if args.bf16 else None

    def train_step():
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        with autocast:
            loss = _diffusion_loss(unet, scheduler, pixels, training_args)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    def sample():
        return sample_pixels(
            unet, scheduler, args.num_images, args.inference_steps, 0, args.batch_size, ema, low_noise_dtype
        )

    def timed(function, reps):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            result = function()
            times.append(time.perf_counter() - start)
        return statistics.median(times), result

    for _ in range(3):  # warm-up: oneDNN builds its kernels for each shape once
        train_step()
    step_s, _ = timed(train_step, 10 * args.reps)
    fit_s, evaluator = timed(fit, args.reps)
    sample()
    sample_s, samples = timed(sample, args.reps)
    score_s, _ = timed(lambda: evaluator.score(samples), args.reps)
    evaluation_s = sample_s + score_s

    print(f"{describe_cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"`{args.preset}` preset, {args.resolution}x{args.resolution}, {args.channels} channel(s); "
        f"{args.num_images} samples x {args.inference_steps} steps against {args.num_reference} reference images; "
        f"{'bf16 as a --mixed_precision bf16 run' if args.bf16 else 'float32'}\n"
    )
    print("| what | seconds |\n|---|---:|")
    print(f"| fitting the evaluator (once per run) | {fit_s:.2f} |")
    print(f"| one evaluation: sampling | {sample_s:.2f} |")
    print(f"| one evaluation: scoring | {score_s:.2f} |")
    print(f"| one evaluation | {evaluation_s:.2f} |")
    print(f"| one training step, batch {args.batch_size} | {step_s:.3f} |\n")
    print("| --eval_steps | added to training |\n|---:|---:|")
    for every in (100, 250, 500, 1000):
        print(f"| {every} | {100 * evaluation_s / (every * step_s):.1f}% |")


if __name__ == "__main__":
    main()
