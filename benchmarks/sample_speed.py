"""Sampling speed: FaceDiffPipeline against diffusers' DDPMPipeline with the same UNet weights, in one run.

    python benchmarks/sample_speed.py [--preset small] [--resolution 32] [--channels 1] [--batch-size 32]
                                      [--steps 20] [--rounds 3] [--threads N] [--compile] [--keep-freed-memory]

Every variant samples the same batch with the same UNet weights, number of steps and threads; the variants alternate
over rounds so that drift in the machine's speed hits all alike. The table gives the median seconds per step, the
spread (min to max), the UNet's achieved GFLOP/s, and a float32 matmul's GFLOP/s measured in the same run as the
machine's ceiling, and the minor page faults per step (fresh memory the kernel had to map and zero). `--compile` adds
`torch.compile` (inductor) and reports its compile time separately. `--keep-freed-memory` first applies
`facediff.allocator.keep_freed_memory()`, as `facediff sample` and `facediff eval` do; it acts on the whole process, so
on every variant alike: run with and without it to see what it is worth.

Identity: DDPMPipeline with `variance_type="fixed_large"` and `clip_sample=False` runs the document's update; both
pipelines draw x_T and every step's noise from the same seeded generator in the same order, so over the full chain of
T steps their images must agree up to float rounding. The check runs on a few images and prints the largest pixel
difference.
"""

import argparse
import copy
import resource
import statistics
import time

import torch
from diffusers import DDPMPipeline, DDPMScheduler
from model_flags import add_model_flags, describe_cpu

from facediff import FaceDiffPipeline, FaceDiffScheduler, build_unet
from facediff.allocator import keep_freed_memory
from facediff.unet_presets import forward_gflops


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The float32 matmul rate on this machine with the current threads: the ceiling a convolution can approach."""
    left, right = torch.randn(size, size), torch.randn(size, size)
    left @ right
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        left @ right
        seconds.append(time.perf_counter() - started)
    return 2 * size**3 / min(seconds) / 1e9


def convolution_profile(unet, batch_size: int) -> tuple[float, float]:
    """Share of a channels_last forward pass spent in convolutions, and their GFLOP/s (torch.profiler, 5 passes)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    unet = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    config = unet.config
    sample = torch.randn(batch_size, config.in_channels, config.sample_size, config.sample_size)
    sample = sample.contiguous(memory_format=torch.channels_last)
    timesteps = torch.full((batch_size,), 500)
    counter = FlopCounterMode(display=False)
    with torch.no_grad():
        with counter:
            unet(sample, timesteps)
        unet(sample, timesteps)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(5):
                unet(sample, timesteps)
    convolution_flops = sum(
        count for op, count in counter.get_flop_counts()["Global"].items() if "convolution" in str(op)
    )
    self_seconds = {event.key: event.self_cpu_time_total / 1e6 for event in profiler.key_averages()}
    convolution_seconds = self_seconds["aten::mkldnn_convolution"] / 5
    return convolution_seconds / (sum(self_seconds.values()) / 5), convolution_flops / convolution_seconds / 1e9


def quiet(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_variants(unet, compile_unet: bool) -> dict:
    """Callables `(batch_size, steps, seed) -> images in [0, 1], NCHW` for each variant, and compile seconds."""

    def run_stock(pipeline):
        def sample(batch_size, steps, seed):
            generator = torch.Generator().manual_seed(seed)
            output = pipeline(batch_size=batch_size, generator=generator, num_inference_steps=steps, output_type="np")
            return torch.from_numpy(output.images).permute(0, 3, 1, 2)

        return sample

    def run_facediff(pipeline, memory_format, low_noise_dtype=None):
        def sample(batch_size, steps, seed):
            generator = torch.Generator().manual_seed(seed)
            return pipeline(
                batch_size=batch_size,
                generator=generator,
                num_inference_steps=steps,
                output_type="pt",
                memory_format=memory_format,
                low_noise_dtype=low_noise_dtype,
            ).images

        return sample

    stock_scheduler = DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large", clip_sample=False)
    # Its own copy of the weights: the pipeline converts its UNet to the memory format it samples in.
    facediff = quiet(FaceDiffPipeline(unet=copy.deepcopy(unet), scheduler=FaceDiffScheduler()))
    variants = {
        "diffusers DDPMPipeline": run_stock(quiet(DDPMPipeline(unet=unet, scheduler=stock_scheduler))),
        "facediff (default: channels_last)": run_facediff(facediff, torch.channels_last),
        "facediff, memory_format=contiguous": run_facediff(
            quiet(FaceDiffPipeline(unet=copy.deepcopy(unet), scheduler=FaceDiffScheduler())), torch.contiguous_format
        ),
        # What `facediff sample --dtype auto` picks on a CPU with AMX or AVX512-BF16 (on others bfloat16 is emulated:
        # slower): float32 weights, bfloat16 autocast for the steps below t = T/2.
        "facediff, bfloat16 below t = T/2 (channels_last)": run_facediff(facediff, torch.channels_last, torch.bfloat16),
        # The UNet in bfloat16 throughout, the chain in float32 (`--dtype bfloat16`).
        "facediff, bfloat16 UNet (channels_last)": run_facediff(
            quiet(FaceDiffPipeline(unet=copy.deepcopy(unet).to(torch.bfloat16), scheduler=FaceDiffScheduler())),
            torch.channels_last,
        ),
    }
    compile_seconds = None
    if compile_unet:
        compiled_unet = torch.compile(copy.deepcopy(unet).to(memory_format=torch.channels_last))
        compiled = quiet(FaceDiffPipeline(unet=compiled_unet, scheduler=FaceDiffScheduler()))
        variants["facediff + torch.compile"] = run_facediff(compiled, torch.channels_last)
        started = time.perf_counter()
        variants["facediff + torch.compile"](2, 2, 0)
        compile_seconds = time.perf_counter() - started
        compiled_bf16 = torch.compile(copy.deepcopy(unet).to(torch.bfloat16).to(memory_format=torch.channels_last))
        variants["facediff, bfloat16 UNet + torch.compile"] = run_facediff(
            quiet(FaceDiffPipeline(unet=compiled_bf16, scheduler=FaceDiffScheduler())), torch.channels_last
        )
    return variants, compile_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per variant, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's default")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument(
        "--check-images",
        type=int,
        default=2,
        help="images for the full-chain identity check (after the table; 0: skip)",
    )
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="reuse freed memory in this process (facediff.allocator)"
    )
    args = parser.parse_args()
    allocator = "glibc defaults"
    if args.keep_freed_memory:
        allocator = "freed memory kept" if keep_freed_memory() else "freed memory kept: not glibc, no effect"
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    unet = build_unet(args.preset, args.resolution, args.channels).eval()
    gflop_per_step = forward_gflops(unet, args.batch_size)
    variants, compile_seconds = build_variants(unet, args.compile)
    for sample in variants.values():
        sample(args.batch_size, 2, 0)  # warm-up: oneDNN primitive caches, allocator

    seconds = {name: [] for name in variants}
    page_faults = {name: 0 for name in variants}
    for _ in range(args.rounds):
        for name, sample in variants.items():
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            started = time.perf_counter()
            sample(args.batch_size, args.steps, 0)
            seconds[name].append((time.perf_counter() - started) / args.steps)
            page_faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    ceiling = matmul_gflops()
    convolution_share, convolution_rate = convolution_profile(unet, args.batch_size)

    print(
        f"{describe_cpu()}\npreset {args.preset}, {args.resolution}px, {args.channels} channel(s), "
        f"batch {args.batch_size}, "
        f"{args.steps} steps per run, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"float32 matmul: {ceiling:.0f} GFLOP/s; allocator: {allocator}"
    )
    print("| sampler | s/step (median) | spread | images/s | UNet GFLOP/s | page faults/step | vs DDPMPipeline |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    stock = statistics.median(seconds["diffusers DDPMPipeline"])
    for name, timings in seconds.items():
        median = statistics.median(timings)
        print(
            f"| {name} | {median:.3f} | {min(timings):.3f}-{max(timings):.3f} | {args.batch_size / median:.1f} | "
            f"{gflop_per_step / median:.0f} | {page_faults[name] / (args.rounds * args.steps):.0f} | "
            f"{stock / median:.2f}x |"
        )
    print(
        f"Profile of a channels_last forward pass: convolutions take {convolution_share:.0%} of it and run at "
        f"{convolution_rate:.0f} GFLOP/s; the rest is GroupNorm, SiLU, concatenation and upsampling."
    )
    if compile_seconds is not None:
        print(f"torch.compile: first call took {compile_seconds:.0f} s")
    if args.check_images > 0:  # last, once the table is out: two full chains of 1000 steps take a while
        stock_images = variants["diffusers DDPMPipeline"](args.check_images, 1000, 0)
        facediff_images = variants["facediff (default: channels_last)"](args.check_images, 1000, 0)
        largest_difference = (stock_images - facediff_images).abs().max().item()
        print(
            f"Full chain of 1000 steps, {args.check_images} images, same generator: largest pixel difference between "
            f"DDPMPipeline and FaceDiffPipeline = {largest_difference:.2e} (pixel range 0-1)"
        )


if __name__ == "__main__":
    main()
