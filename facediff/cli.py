"""The `facediff` command: `facediff sample MODEL ...` draws images from a trained pipeline, `facediff eval MODEL
--reference DATA ...` scores its samples against reference images."""

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .allocator import keep_freed_memory
from .atomic_files import write_json
from .data import ImageSourceError
from .errors import first_line
from .hub import FaceDiffPipeline, check_model_location
from .model_card import EVAL_RESULTS_NAME, evaluation_table, load_card, model_digest, refresh_card_evaluation
from .output_dir import check_writable_file
from .pipelines import FaceDiffScheduler
from .precision import auto_dtype
from .sample_grids import draw, save_grid

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# "auto" leaves the choice to the pipeline: channels_last on a CPU, contiguous on a GPU (the faster on each).
MEMORY_FORMATS = {"auto": None, "channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# What `facediff sample` writes into --out: 00000.png, 00001.png, ... and grid.png.
SAMPLE_FILE_NAME = re.compile(r"\d{5,}\.png|grid\.png")


def sample(args: argparse.Namespace) -> Path:
    """
    Write `args.num_images` PNGs and a grid into `args.out`. Image i is drawn with its own generator seeded
    `seed + i`, so it is the same image whatever the batch size.

    Args:
        args (`argparse.Namespace`):
            `model`, `num_images`, `steps`, `seed`, `batch_size`, `out`, `overwrite` (replace the samples that an
            earlier run left in `out`), and the sampler options that `load_sampler` reads.

    Returns:
        `Path`: the grid.
    """
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: pass a folder for the PNGs.")
    earlier_samples = sorted(path for path in out.glob("*.png") if SAMPLE_FILE_NAME.fullmatch(path.name))
    if earlier_samples and not args.overwrite:
        # New images would mix with the old ones, and a shorter run would leave old ones beside a new grid.
        names = ", ".join(path.name for path in earlier_samples[:2]) + (", ..." if len(earlier_samples) > 2 else "")
        raise ValueError(
            f"--out {out} already holds samples ({names}): choose a new or empty --out, or pass --overwrite to "
            "replace them."
        )
    pipeline, precision_note = load_sampler(args)
    _check_steps(pipeline, [args.steps])
    for path in earlier_samples:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    print(precision_note, file=sys.stderr)
    images = []
    batches = draw(
        pipeline, args.num_images, args.steps, args.seed, args.batch_size, "pil", MEMORY_FORMATS[args.memory_format]
    )
    for indices, batch in batches:
        for index, image in zip(indices, batch, strict=True):
            image.save(out / f"{index:05d}.png")
        images += batch
    return save_grid(images, out / "grid.png")


def evaluate(args: argparse.Namespace) -> tuple[dict, Path, Path | None]:
    """
    Score `args.num_images` samples per step count in `args.steps` against the reference images; write the results
    as JSON and, when they go into a model folder with a card, refresh its card.

    Args:
        args (`argparse.Namespace`):
            `model`, `reference`, `num_images`, `steps`, `seed`, `batch_size`, `inception_weights`, `no_inception`,
            `max_reference`, `out`, and the sampler options that `load_sampler` reads.

    Returns:
        `tuple[dict, Path, Path | None]`: the results, the JSON file, and the refreshed card (or None).
    """
    # Imported here: torchmetrics adds a second or more to start-up, which `facediff sample` need not pay.
    from .evaluation import MEMORISATION_PERCENTILE, SampleEvaluator, load_fid_inception, load_reference

    # Every check that needs no model comes first: an evaluation takes minutes, and its results must have a place.
    device = _device(args)
    model_folder = _model_folder(args.model)
    if args.out is None and model_folder is None:
        raise ValueError(
            f"{args.model} is not a local folder: pass the path of a saved pipeline, or --out FILE for the results "
            "of a Hub model."
        )
    out = Path(args.out) if args.out is not None else model_folder / EVAL_RESULTS_NAME
    check_writable_file(out, "--out")
    writes_model_results = model_folder is not None and out.resolve() == (model_folder / EVAL_RESULTS_NAME).resolve()
    card = model_folder / "README.md" if writes_model_results and (model_folder / "README.md").is_file() else None
    if card is not None:
        load_card(model_folder)  # a card that cannot be refreshed fails now, not after the evaluation
    step_counts = list(dict.fromkeys(args.steps))  # a repeated count would be sampled again and reported twice
    try:
        inception = None if args.no_inception else load_fid_inception(args.inception_weights)
    except (FileNotFoundError, ValueError) as error:
        given = f"--inception-weights {error}" if args.inception_weights is not None else str(error)
        raise ValueError(f"{given}; --inception-weights PATH passes it, --no-inception skips FID and KID.") from error
    pipeline, precision_note = load_sampler(args)
    _check_steps(pipeline, step_counts)  # before the reference is read
    unet_config = pipeline.unet.config
    try:
        reference = load_reference(
            args.reference, unet_config.sample_size, unet_config.in_channels, args.max_reference, args.seed
        )
    except ImageSourceError as error:
        raise ValueError(error.naming(location="--reference")) from error
    evaluator = SampleEvaluator(reference, inception, args.batch_size, device, args.seed)
    print(precision_note, file=sys.stderr)
    rows = []
    for steps in step_counts:
        start = time.perf_counter()
        batches = draw(
            pipeline, args.num_images, steps, args.seed, args.batch_size, "np", MEMORY_FORMATS[args.memory_format]
        )
        # Quantised as the PNGs that `facediff sample` writes.
        samples = np.concatenate([(batch * 255).round().astype(np.uint8) for _, batch in batches])
        sampling_seconds = time.perf_counter() - start
        scores = evaluator.score(torch.from_numpy(samples).permute(0, 3, 1, 2).contiguous())
        num_steps = steps or pipeline.scheduler.config.num_train_timesteps
        rows.append({"steps": num_steps, **scores, "sampling_seconds": round(sampling_seconds, 1)})
    results = {
        "model": args.model,
        "model_digest": model_digest(model_folder) if model_folder is not None else None,
        "reference": args.reference,
        "reference_name": _dataset_name(args.reference),
        # As load_reference reads it: a local folder when it exists, else a Hub dataset id.
        "reference_dataset_id": None if Path(args.reference).exists() else args.reference,
        "num_reference": len(reference),
        "num_images": args.num_images,
        "seed": args.seed,
        "variance_type": pipeline.scheduler.config.variance_type,
        "eta": pipeline.scheduler.config.eta,
        "clip_sample": pipeline.scheduler.config.clip_sample,
        "pixel_pca_components": evaluator.pixel_pca.num_features,
        "memorisation_percentile": MEMORISATION_PERCENTILE,
        "memorisation_threshold": evaluator.memorisation_threshold,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    refreshed = refresh_card_evaluation(model_folder) if card is not None else None
    return results, out, refreshed


def load_sampler(args: argparse.Namespace) -> tuple[FaceDiffPipeline, str]:
    """
    The pipeline of `args.model` on its device and in its precision, with the sampler options applied, and a line
    that says which precision and why.

    Args:
        args (`argparse.Namespace`):
            `model`, `device`, `dtype`, `variance_type`, `eta`, `clip_sample` (scheduler options; `None` keeps the
            saved ones), `threads`, `memory_format` and `compile`.

    Returns:
        `tuple[FaceDiffPipeline, str]`
    """
    device = _device(args)  # a bad --device fails before the model is read
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.dtype == "auto":
        dtype, reason = auto_dtype(device)
        precision_note = f"Sampling in {reason}; --dtype float32 or bfloat16 overrides."
    else:
        dtype, precision_note = DTYPES[args.dtype], f"Sampling in {args.dtype} (--dtype)."
    pipeline = FaceDiffPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    scheduler_options = {"variance_type": args.variance_type, "eta": args.eta, "clip_sample": args.clip_sample}
    scheduler_options = {name: value for name, value in scheduler_options.items() if value is not None}
    if scheduler_options:
        pipeline.scheduler = FaceDiffScheduler.from_config(pipeline.scheduler.config, **scheduler_options)
    if args.compile:
        # On a GPU, CUDA graphs ("reduce-overhead") also remove the launch gaps between a step's many small kernels.
        mode = "reduce-overhead" if pipeline.device.type == "cuda" else "default"
        pipeline.unet = torch.compile(pipeline.unet, mode=mode)
    return pipeline, precision_note


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facediff", description="Sample from and evaluate facediff DDPM pipelines.")
    commands = parser.add_subparsers(dest="command", required=True)
    # What both commands sample with.
    sampler_options = argparse.ArgumentParser(add_help=False)
    sampler_options.add_argument("--device", default=None, help="cpu, cuda, mps, ...; default: cuda when available")
    sampler_options.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="the UNet's precision (the sampling chain stays float32); auto: bfloat16 where the CPU or GPU computes it "
        "natively (AMX, AVX512-BF16, recent GPUs), else float32",
    )
    sampler_options.add_argument(
        "--variance-type", choices=["fixed_large", "fixed_small"], default=None, help="default: the saved scheduler's"
    )
    sampler_options.add_argument("--eta", type=float, default=None, help="DDIM eta in [0, 1] on the same chain")
    sampler_options.add_argument(
        "--clip-sample",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="clip each step's x_0 prediction to [-1, 1] (advised with --eta 0); default: the saved scheduler's",
    )
    sampler_options.add_argument("--threads", type=_positive, default=None, help="CPU threads; default: torch's")
    sampler_options.add_argument(
        "--memory-format",
        choices=list(MEMORY_FORMATS),
        default="auto",
        help="tensor layout while sampling; auto: channels_last on a CPU, contiguous on a GPU (faster on each)",
    )
    sampler_options.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (with CUDA graphs on a GPU) after about a minute's compile: 1.35-1.56x the "
        "stock pipeline's speed on a 2-core CPU, 1.72x on an H100 in fp16",
    )
    sampler = commands.add_parser("sample", parents=[sampler_options], help="draw images from a trained pipeline")
    sampler.add_argument("model", help="a pipeline folder or a Hub repo id (user/name)")
    sampler.add_argument("--num-images", type=_positive, default=64)
    sampler.add_argument("--steps", type=_positive, default=None, help="respaced sampling steps; default: all T")
    sampler.add_argument("--seed", type=int, default=0)
    sampler.add_argument("--batch-size", type=_positive, default=16)
    sampler.add_argument("--out", default="samples", help="folder for the PNGs and grid.png")
    sampler.add_argument(
        "--overwrite", action="store_true", help="replace the PNGs and grid.png that an earlier run left in --out"
    )

    evaluator = commands.add_parser(
        "eval",
        parents=[sampler_options],
        help="score samples against reference images: FID, KID, a pixel-PCA Frechet distance, memorisation",
    )
    evaluator.add_argument("model", help="a pipeline folder or a Hub repo id (user/name)")
    evaluator.add_argument(
        "--reference", required=True, help="the training images: an image folder, a save_to_disk folder or a Hub id"
    )
    evaluator.add_argument(
        "--num-images", type=_positive_pair, default=1000, help="samples per step count; default: 1000"
    )
    evaluator.add_argument(
        "--steps", type=_positive, nargs="+", default=[None], help="respaced steps, one row each; default: all T"
    )
    evaluator.add_argument("--seed", type=int, default=0)
    evaluator.add_argument("--batch-size", type=_positive, default=16)
    weights = evaluator.add_mutually_exclusive_group()
    weights.add_argument(
        "--inception-weights",
        default=None,
        help="the FID Inception weights (pt_inception-2015-12-05-6726825d.pth); default: torch hub's cache",
    )
    weights.add_argument("--no-inception", action="store_true", help="skip FID and KID: no weights needed")
    evaluator.add_argument(
        "--max-reference", type=_positive_pair, default=None, help="use a seeded random subset of the reference images"
    )
    evaluator.add_argument("--out", default=None, help=f"the JSON results; default: MODEL/{EVAL_RESULTS_NAME}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # this process is ours: reuse freed tensor memory rather than fault in fresh pages
    try:
        if args.command == "sample":
            grid = sample(args)
            print(f"Wrote {args.num_images} images and {grid}")
        else:
            results, out, card = evaluate(args)
            print(evaluation_table(results))
            print(f"Wrote {out}" + (f" and refreshed {card}" if card is not None else ""))
    except (ValueError, OSError) as error:
        print(f"error: {error}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


def _dataset_name(reference: str) -> str:
    """A Hub id as it is; a folder by its name, with its parent's when the name is a split's (olivetti-faces/train)."""
    path = Path(reference).resolve()
    if not Path(reference).exists():
        return reference
    return f"{path.parent.name}/{path.name}" if path.name in ("train", "test", "validation") else path.name


def _model_folder(model: str) -> Path | None:
    """The folder `model` names, or `None` for a Hub repo id; anything else is refused now, before the other checks."""
    check_model_location(model)
    return Path(model) if Path(model).is_dir() else None


def _check_steps(pipeline: FaceDiffPipeline, step_counts: list[int | None]) -> None:
    """Refuse a step count the schedule cannot take, before anything is drawn or written."""
    num_train_timesteps = pipeline.scheduler.config.num_train_timesteps
    for steps in step_counts:
        if steps is not None and steps > num_train_timesteps:
            raise ValueError(
                f"--steps {steps} is more than the model's {num_train_timesteps} training steps: pass --steps "
                f"{num_train_timesteps} or fewer, or leave it out for all of them."
            )
        pipeline.scheduler.set_timesteps(steps or num_train_timesteps)  # and anything else the scheduler refuses


def _device(args: argparse.Namespace) -> str:
    """`--device`, checked: a device torch knows and this machine has; default: cuda when available, else cpu."""
    if args.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    fix = "pass --device cpu, or leave --device out to use cuda when available."
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(
            f"--device {args.device} is not a device torch knows (cpu, cuda, cuda:1, mps, ...): {fix}"
        ) from None
    try:
        torch.empty(0, device=device)  # reaches the device, as the pipeline will
    except (RuntimeError, AssertionError) as error:  # a CPU-only torch asserts on cuda
        # torch's first sentence says why (no driver, not compiled in); the rest can be a page of backend names.
        reason = re.split(r"(?<=\.)\s", first_line(error))[0].rstrip(".")
        raise ValueError(f"--device {args.device} is not available on this machine ({reason}): {fix}") from error
    return args.device


def _positive(text: str) -> int:
    """At least 1; argparse names the option."""
    return _integer_at_least(text, 1)


def _positive_pair(text: str) -> int:
    """At least 2: a covariance or a nearest other image needs two."""
    return _integer_at_least(text, 2)


def _integer_at_least(text: str, minimum: int) -> int:
    # ArgumentTypeError for every refusal: for any other error argparse names the type function (`_positive`).
    message = f"{text!r} is not an integer of at least {minimum}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    if value < minimum:
        raise argparse.ArgumentTypeError(message)
    return value


if __name__ == "__main__":
    sys.exit(main())
