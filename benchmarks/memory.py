"""Peak memory of sampling and of a training step, per UNet preset, resolution and batch size.

    python benchmarks/memory.py [--configs small:32:1 small:64:3 base:32:3] [--batch-sizes 8 32]

Each measurement runs in a fresh process, so its peak resident memory (ru_maxrss) is its own: the table gives that
peak and, beside it, the growth over the same process's RSS once the model is built (the part that scales with the
batch). Sampling is one FaceDiffPipeline denoising step (every step has the same footprint); training is one
facediff training step (forward, backward, clipping, AdamW, EMA update). On CUDA, read
`torch.cuda.max_memory_allocated` instead: this script measures the CPU path these machines have.
"""

import argparse
import json
import resource
import subprocess
import sys

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(task: str, preset: str, resolution: int, channels: int, batch_size: int) -> dict:
    from diffusers.training_utils import EMAModel

    from facediff import FaceDiffPipeline, FaceDiffScheduler, build_unet
    from facediff.training import _diffusion_loss
    from facediff.training_args import TrainingArguments

    torch.manual_seed(0)
    unet = build_unet(preset, resolution, channels)
    scheduler = FaceDiffScheduler()
    if task == "sampling":
        pipeline = FaceDiffPipeline(unet=unet.eval(), scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        model_mb = peak_rss_mb()
        pipeline(batch_size=batch_size, num_inference_steps=1, output_type="pt")
    else:
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        ema = EMAModel(unet.parameters())
        pixels = torch.randint(0, 256, (batch_size, channels, resolution, resolution), dtype=torch.uint8)
        args = TrainingArguments(output_dir="unused", snr_gamma=0.0)
        model_mb = peak_rss_mb()
        loss = _diffusion_loss(unet, scheduler, pixels, args)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
    return {"peak_mb": peak_rss_mb(), "model_mb": model_mb}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["small:32:1", "small:64:3", "base:32:3"],
                        help="preset:resolution:channels")  # fmt: skip
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--measure", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        task, preset, resolution, channels, batch_size = args.measure
        print(json.dumps(measure(task, preset, int(resolution), int(channels), int(batch_size))))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32")
    print("| preset | resolution | channels | batch | sampling peak RSS | growth | training peak RSS | growth |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for config in args.configs:
        preset, resolution, channels = config.split(":")
        for batch_size in args.batch_sizes:
            row = []
            for task in ("sampling", "training"):
                command = [sys.executable, __file__, "--measure", task, preset, resolution, channels, str(batch_size)]
                output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                measured = json.loads(output.strip().splitlines()[-1])
                row += [f"{measured['peak_mb']:.0f} MB", f"{measured['peak_mb'] - measured['model_mb']:.0f} MB"]
            print(f"| {preset} | {resolution} | {channels} | {batch_size} | {' | '.join(row)} |")


if __name__ == "__main__":
    main()
