"""Sampling and training speed on a CUDA GPU in each precision: facediff against stock diffusers, in one run.

    python benchmarks/cuda_speed.py [--preset base] [--resolution 32] [--channels 3] [--batch-size 64]
                                    [--sample-steps 50] [--train-steps 20] [--rounds 3]
                                    [--dtypes float32 float16 bfloat16] [--compile-dtypes float16]

Sampling: diffusers' DDPMPipeline and FaceDiffPipeline sample the same batch with the same UNet weights, dtype and
number of steps; FaceDiffPipeline in its default layout (contiguous on a GPU) and in channels_last, and, for the dtypes
named by `--compile-dtypes`, with `torch.compile` in its default mode and in "reduce-overhead" mode (CUDA graphs, what
`facediff sample --compile` uses on a GPU); compile time is reported apart. Training: one optimizer step of the stock
diffusers loop (train_unconditional.py's DDPMScheduler.add_noise, MSE on the noise, backward, clipping, AdamW, EMA)
against facediff's `facediff.training._diffusion_loss` with the same rest (and the EMA's `foreach` update, as facediff's
loop runs it), in both layouts; under `torch.autocast` for float16 and bfloat16 (with a GradScaler for float16), as
Accelerate's mixed precision runs them, and in float32 otherwise (TF32 convolutions, cuDNN's default).

Each run is bracketed by `torch.cuda.synchronize()`; the variants alternate over rounds after a warm-up; the tables
give the median and the spread (min to max), images/s, the UNet's achieved TFLOP/s, and peak memory
(`torch.cuda.max_memory_allocated`, reset per variant). Without a GPU it runs on the CPU, for a dry run only.
"""

import argparse
import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers.training_utils import EMAModel
from model_flags import add_model_flags

from facediff import FaceDiffPipeline, FaceDiffScheduler, build_unet
from facediff.training import _diffusion_loss
from facediff.training_args import TrainingArguments
from facediff.unet_presets import forward_gflops

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def quiet(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sampling_variants(unet, compile_unet: bool, device: torch.device) -> tuple[dict, dict]:
    """Callables `(batch_size, steps) -> None` that sample, and the compile seconds of the compiled ones."""

    def stock(pipeline):
        def sample(batch_size, steps):
            pipeline(batch_size=batch_size, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                     output_type="pt")  # fmt: skip

        return sample

    def ours(pipeline, memory_format):
        def sample(batch_size, steps):
            pipeline(batch_size=batch_size, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                     output_type="pt", memory_format=memory_format)  # fmt: skip

        return sample

    stock_scheduler = DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large", clip_sample=False)
    variants = {
        "diffusers DDPMPipeline": stock(quiet(DDPMPipeline(unet=unet, scheduler=stock_scheduler))),
        "facediff (default layout)": ours(
            quiet(FaceDiffPipeline(unet=copy.deepcopy(unet), scheduler=FaceDiffScheduler())), None
        ),
        "facediff, channels_last": ours(
            quiet(FaceDiffPipeline(unet=copy.deepcopy(unet), scheduler=FaceDiffScheduler())), torch.channels_last
        ),
    }
    compile_seconds = {}
    if compile_unet:
        # "reduce-overhead" adds CUDA graphs; `facediff sample --compile` picks it on a GPU.
        for mode in ("default", "reduce-overhead"):
            name = f"facediff + torch.compile({mode})"
            compiled_unet = torch.compile(copy.deepcopy(unet), mode=mode)
            variants[name] = ours(quiet(FaceDiffPipeline(unet=compiled_unet, scheduler=FaceDiffScheduler())), None)
            started = time.perf_counter()
            variants[name](2, 3)
            synchronize(device)
            compile_seconds[name] = time.perf_counter() - started
    return variants, compile_seconds


def training_variants(unet, dtype: torch.dtype, batch_size: int, device: torch.device) -> dict:
    """Callables `() -> None` that each run one training step on their own copy of the UNet and optimizer."""
    config = unet.config
    pixels = torch.randint(0, 256, (batch_size, config.in_channels, config.sample_size, config.sample_size),
                           dtype=torch.uint8, device=device)  # fmt: skip
    autocast = dtype != torch.float32
    stock_scheduler = DDPMScheduler(num_train_timesteps=1000)
    facediff_scheduler = FaceDiffScheduler()
    args = TrainingArguments(output_dir="unused", snr_gamma=0.0)

    def stock_loss(model):
        clean = pixels.float() / 127.5 - 1
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, 1000, (batch_size,), device=device)
        prediction = model(stock_scheduler.add_noise(clean, noise, timesteps), timesteps).sample
        return F.mse_loss(prediction.float(), noise.float())

    def facediff_loss(model):
        return _diffusion_loss(model, facediff_scheduler, pixels, args)

    def make_step(loss_fn, memory_format, foreach_ema):
        model = copy.deepcopy(unet).to(memory_format=memory_format).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                       foreach=foreach_ema)  # fmt: skip
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                loss = loss_fn(model)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema.step(model.parameters())

        return step

    return {
        "stock diffusers loop": make_step(stock_loss, torch.contiguous_format, foreach_ema=False),
        "facediff": make_step(facediff_loss, torch.contiguous_format, foreach_ema=True),
        "facediff, channels_last": make_step(facediff_loss, torch.channels_last, foreach_ema=True),
    }


def time_alternating(variants: dict, run, rounds: int, device: torch.device) -> tuple[dict, dict]:
    """Seconds per run of each variant over `rounds` alternating rounds, and each variant's peak memory."""
    seconds = {name: [] for name in variants}
    peaks = dict.fromkeys(variants, 0.0 if device.type == "cuda" else math.nan)  # no peak to read on a CPU
    for _ in range(rounds):
        for name, variant in variants.items():
            reset_peak_memory(device)
            synchronize(device)
            started = time.perf_counter()
            run(variant)
            synchronize(device)
            seconds[name].append(time.perf_counter() - started)
            peaks[name] = max(peaks[name], peak_memory_mb(device))
    return seconds, peaks


def print_table(title: str, seconds: dict, peaks: dict, per_run: int, images_per_run: int, gflop_per_unit: float):
    print(f"\n{title}")
    print("| variant | ms/step (median) | spread | images/s | TFLOP/s | peak memory | vs stock |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    stock = statistics.median(next(iter(seconds.values())))
    for name, timings in seconds.items():
        median = statistics.median(timings)
        peak = f"{peaks[name]:.0f} MB" if math.isfinite(peaks[name]) else "n/a"  # measured on CUDA only
        print(
            f"| {name} | {1000 * median / per_run:.2f} | {1000 * min(timings) / per_run:.2f}-"
            f"{1000 * max(timings) / per_run:.2f} | {images_per_run / median:.0f} | "
            f"{gflop_per_unit * per_run / median / 1000:.1f} | {peak} | {stock / median:.2f}x |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser, preset="base", channels=3, batch_size=64)
    parser.add_argument("--sample-steps", type=int, default=50, help="sampling steps per timed run")
    parser.add_argument("--train-steps", type=int, default=20, help="training steps per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per variant, alternating")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--no-training", action="store_true", help="time sampling only")
    parser.add_argument("--compile-dtypes", nargs="*", default=[], choices=list(DTYPES),
                        help="also time torch.compile in these dtypes (a minute or more each)")  # fmt: skip
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(
        f"{name}, torch {torch.__version__}; preset {args.preset}, {args.resolution}px, {args.channels} channel(s), "
        f"batch {args.batch_size}; sampling {args.sample_steps} steps per run, training {args.train_steps} steps per "
        f"run, {args.rounds} rounds"
    )

    torch.manual_seed(0)
    float32_unet = build_unet(args.preset, args.resolution, args.channels).eval()
    gflop_per_forward = forward_gflops(float32_unet, args.batch_size)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        unet = copy.deepcopy(float32_unet).to(device=device, dtype=dtype)
        with torch.no_grad():
            variants, compile_seconds = sampling_variants(unet, dtype_name in args.compile_dtypes, device)
            for variant in variants.values():
                variant(args.batch_size, 2)  # warm-up: cuDNN algorithm choice, allocator
            seconds, peaks = time_alternating(
                variants, lambda sample: sample(args.batch_size, args.sample_steps), args.rounds, device
            )
        print_table(f"Sampling, {dtype_name}", seconds, peaks, args.sample_steps, args.batch_size, gflop_per_forward)
        for variant_name, spent in compile_seconds.items():
            print(f"{variant_name}: first call (compile) took {spent:.0f} s")
        del variants

        if args.no_training:
            continue
        # Mixed precision trains float32 weights under autocast, as Accelerate does.
        steps = training_variants(float32_unet.to(device), dtype, args.batch_size, device)
        for step in steps.values():
            for _ in range(3):
                step()

        def run_training(step):
            for _ in range(args.train_steps):
                step()

        seconds, peaks = time_alternating(steps, run_training, args.rounds, device)
        title = f"Training step, {dtype_name}" + (" autocast" if dtype != torch.float32 else " (TF32 convolutions)")
        # A backward pass costs about twice the forward's FLOPs.
        print_table(title, seconds, peaks, args.train_steps, args.batch_size * args.train_steps, 3 * gflop_per_forward)
        float32_unet.cpu()
        del steps


if __name__ == "__main__":
    main()
