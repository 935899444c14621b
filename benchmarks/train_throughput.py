"""Training-step throughput and peak memory: facediff's step against a stock diffusers loop, in one run.

    python benchmarks/train_throughput.py [--preset small] [--resolution 32] [--batch-size 32] [--channels 1]

The stock loop is diffusers' examples/unconditional_image_generation/train_unconditional.py reduced to its step:
DDPMScheduler.add_noise, the same UNet2DModel config, MSE on the noise, backward, gradient clipping, AdamW and an
EMAModel update; it is also timed with the single thread that `accelerate launch` gives a CPU run (OMP_NUM_THREADS=1),
where facediff's training uses the machine's cores. facediff's step is `facediff.training._diffusion_loss`, the same
clipping, AdamW with the same settings as facediff's loop builds it (`build_optimizer`: one fused kernel), and the EMA
update as facediff's loop runs it (`foreach=True`); it is timed with and without
`facediff.allocator.keep_freed_memory()` applied to its process (`train_accelerate.py` applies it; a script of your own
that calls `facediff.training.train` decides for itself).
Each variant runs in fresh processes (so peak RSS is its own), alternating over rounds, after warm-up steps; the
table gives the median images/s over all repetitions and the spread (min to max).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from model_flags import add_model_flags, describe_cpu


def run_variant(variant: str, preset: str, resolution: int, channels: int, batch_size: int, steps: int, reps: int):
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from facediff import FaceDiffScheduler, build_unet
    from facediff.allocator import keep_freed_memory
    from facediff.training import _diffusion_loss, build_optimizer
    from facediff.training_args import TrainingArguments

    if variant.endswith("-kept"):
        keep_freed_memory()
    if variant == "diffusers-launched":
        torch.set_num_threads(1)  # what `accelerate launch` leaves train_unconditional.py on CPU: OMP_NUM_THREADS=1
    torch.manual_seed(0)
    unet = build_unet(preset, resolution, channels)
    settings = TrainingArguments(output_dir="unused", learning_rate=1e-4, snr_gamma=0.0)
    if variant.startswith("diffusers"):
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    else:
        optimizer = build_optimizer(settings, unet.parameters(), Accelerator())  # fused where torch has it
    # facediff's loop updates the EMA with diffusers' multi-tensor path; train_unconditional.py with the default loop.
    foreach = variant.startswith("facediff")
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75, foreach=foreach)
    pixels = torch.randint(0, 256, (batch_size, channels, resolution, resolution), dtype=torch.uint8)

    if variant.startswith("diffusers"):
        scheduler = DDPMScheduler(num_train_timesteps=1000)

        def loss_fn():
            clean = pixels.float() / 127.5 - 1
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, 1000, (batch_size,))
            prediction = unet(scheduler.add_noise(clean, noise, timesteps), timesteps).sample
            return F.mse_loss(prediction.float(), noise.float())
    else:
        scheduler = FaceDiffScheduler()

        def loss_fn():
            # As Accelerate runs a --mixed_precision bf16 step: the forward pass under autocast, the weights float32.
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.startswith("facediff-bf16")):
                return _diffusion_loss(unet, scheduler, pixels, settings)

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    for _ in range(3):
        step()
    rates = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(reps):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * batch_size / (time.perf_counter() - started))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    faults_per_step = (usage.ru_minflt - faults) / (reps * steps)
    print(json.dumps({"rates": rates, "peak_mb": usage.ru_maxrss / 1024, "faults_per_step": faults_per_step}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--steps", type=int, default=10, help="steps per repetition")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per process")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant, alternating")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setting = (args.preset, args.resolution, args.channels, args.batch_size, args.steps, args.reps)
    if args.variant:
        run_variant(args.variant, *setting)
        return

    # Alternate the variants over several rounds so that drift in the machine's speed hits both alike.
    variants = ("diffusers", "facediff", "facediff-kept", "facediff-bf16", "facediff-bf16-kept", "diffusers-launched")
    results = {variant: {"rates": [], "peak_mb": 0.0, "faults": []} for variant in variants}
    for _ in range(args.rounds):
        for variant in results:
            command = [sys.executable, __file__, "--variant", variant, "--preset", args.preset, "--resolution",
                       str(args.resolution), "--channels", str(args.channels), "--batch-size", str(args.batch_size),
                       "--steps", str(args.steps), "--reps", str(args.reps)]  # fmt: skip
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            measured = json.loads(output.strip().splitlines()[-1])
            results[variant]["rates"] += measured["rates"]
            results[variant]["peak_mb"] = max(results[variant]["peak_mb"], measured["peak_mb"])
            results[variant]["faults"].append(measured["faults_per_step"])

    print(describe_cpu())
    print(f"preset {args.preset}, {args.resolution}px, {args.channels} channel(s), batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip
    print("| training step | images/s (median) | spread | peak RSS | page faults/step | vs stock |")
    print("|---|---:|---:|---:|---:|---:|")
    stock = statistics.median(results["diffusers"]["rates"])
    labels = {
        "diffusers": "stock diffusers loop, same threads",
        "facediff": "facediff's step, freed memory not kept (its `train` called from a script of your own)",
        "facediff-kept": "facediff as `train_accelerate.py` runs it (freed memory kept)",
        "facediff-bf16": "facediff, bfloat16 autocast, freed memory not kept",
        "facediff-bf16-kept": "facediff, bfloat16 autocast (`--mixed_precision bf16`) as `train_accelerate.py` runs it",
        "diffusers-launched": "stock loop as `accelerate launch` runs it on CPU (1 thread)",
    }
    for variant, label in labels.items():
        rates = results[variant]["rates"]
        median = statistics.median(rates)
        print(f"| {label} | {median:.1f} | {min(rates):.1f}-{max(rates):.1f} | "
              f"{results[variant]['peak_mb']:.0f} MB | {statistics.median(results[variant]['faults']):.0f} | "
              f"{median / stock:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
