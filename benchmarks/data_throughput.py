"""Is the data path the bottleneck? Images/s of facediff's data path against the training step, on real faces.

    python benchmarks/data_throughput.py [--data ../shared/datasets/utkface-crop/train] [--resolution 64]

Rows: decoding every JPEG on every access (what train_unconditional.py's transforms do each epoch, one process);
facediff's one-time preprocessing (decode at reduced JPEG scale, convert, resize, crop; in `datasets.map` with
several processes, into a fresh cache); an epoch read back from that cache through a DataLoader; and the training
step of the `small` preset at the same resolution, for scale.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared/datasets/utkface-crop/train"))
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="facediff-bench-")
    os.environ["HF_DATASETS_CACHE"] = cache  # a cold cache, removed afterwards (UTKFace's takes about 100 MB)
    try:
        measure(args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def measure(args: argparse.Namespace):
    import numpy as np
    import torch
    from PIL import Image

    from facediff import FaceDiffScheduler, build_unet, data
    from facediff.training import _diffusion_loss
    from facediff.training_args import TrainingArguments

    source = data.ImageSource(location=args.data, is_image_folder=True, resolution=args.resolution)
    raw, column = data.load_raw_dataset(source)
    paths = [item["path"] for item in raw[column]]
    rows = []

    started = time.perf_counter()
    sample = paths[:1000]
    for path in sample:
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((args.resolution, args.resolution), Image.Resampling.BILINEAR)
            torch.from_numpy(np.array(resized)).permute(2, 0, 1).float()
    rows.append(("decode on every access (1 process)", len(sample) / (time.perf_counter() - started)))

    started = time.perf_counter()
    processed = data.preprocess_images(raw, column, source, 3)
    processes = data.preprocessing_processes(source, len(raw)) or 1
    label = f"facediff preprocessing, once ({processes} process{'es' if processes > 1 else ''})"
    rows.append((label, len(raw) / (time.perf_counter() - started)))

    loader = torch.utils.data.DataLoader(processed, batch_size=args.batch_size, shuffle=True, drop_last=True)
    started, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch[data.PIXELS])
    rows.append(("epoch from the preprocessed cache", seen / (time.perf_counter() - started)))

    unet = build_unet("small", args.resolution, 3)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    scheduler = FaceDiffScheduler()
    pixels = next(iter(loader))[data.PIXELS]
    for index in range(6):
        if index == 1:
            started = time.perf_counter()
        _diffusion_loss(unet, scheduler, pixels, TrainingArguments(output_dir="unused", snr_gamma=0.0)).backward()
        optimizer.step()
        optimizer.zero_grad()
    rows.append(
        (f"training step, small preset, batch {args.batch_size}", 5 * args.batch_size / (time.perf_counter() - started))
    )

    print(f"{len(raw)} images from {args.data}, {args.resolution}px RGB, python {sys.version.split()[0]}")
    print("| stage | images/s |")
    print("|---|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
