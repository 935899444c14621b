"""The `facediff` command: `facediff sample MODEL ...` draws images from a trained pipeline, `facediff eval MODEL
--reference DATA ...` scores its samples against reference images, `facediff inpaint`, `edit` and `interpolate`
edit images with it, and `facediff export CHECKPOINT OUT` makes a pipeline of a training checkpoint."""

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image

from .allocator import keep_freed_memory
from .atomic_files import replace_entries, write_json
from .checkpointing import list_checkpoints
from .data import ImageSourceError
from .editing import FaceDiffImg2ImgPipeline, FaceDiffInpaintPipeline, FaceDiffInterpolationPipeline
from .errors import first_line
from .export import export_checkpoint
from .hub import FaceDiffPipeline, check_model_location
from .model_card import EVAL_RESULTS_NAME, evaluation_table, load_card, model_digest, refresh_card_evaluation
from .output_dir import check_writable_file
from .pipelines import FaceDiffScheduler
from .precision import sampling_precision
from .sample_grids import draw, save_grid

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# "auto" leaves the choice to the pipeline: channels_last on a CPU, contiguous on a GPU (the faster on each).
MEMORY_FORMATS = {"auto": None, "channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# What `facediff sample` writes into --out: 00000.png, 00001.png, ... and grid.png.
SAMPLE_FILE_NAME = re.compile(r"\d{5,}\.png|grid\.png")
# What `facediff inpaint` and `interpolate` write into --out (results or frames, and the strip), and `facediff edit`.
NUMBERED_RESULT_FILE_NAME = re.compile(r"\d{5,}\.png|strip\.png")
EDIT_FILE_NAME = re.compile(r"strength-[0-9.e+-]+\.png|strip\.png")


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
    earlier_samples = _earlier_outputs(out, SAMPLE_FILE_NAME, args.overwrite, "samples")
    pipeline, low_noise_dtype, precision_note = load_sampler(args)
    _check_steps(pipeline, [args.steps])
    for path in earlier_samples:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    print(precision_note, file=sys.stderr)
    images = []
    batches = draw(
        pipeline,
        args.num_images,
        args.steps,
        args.seed,
        args.batch_size,
        "pil",
        MEMORY_FORMATS[args.memory_format],
        low_noise_dtype=low_noise_dtype,
    )
    for indices, batch in batches:
        for index, image in zip(indices, batch, strict=True):
            image.save(out / f"{index:05d}.png")
        images += batch
    return save_grid(images, out / "grid.png")


def inpaint(args: argparse.Namespace) -> Path:
    """
    Fill in the white part of `args.mask` in `args.image`: write `args.num_images` results (result i drawn with seed
    `seed + i`) and a strip: the image as the model sees it, the part kept, the results.

    Args:
        args (`argparse.Namespace`):
            `model`, `image`, `mask`, `num_images`, `steps`, `jump_length`, `jump_n_sample`, `seed`, `out`,
            `overwrite`, and the sampler options that `load_sampler` reads.

    Returns:
        `Path`: the strip.
    """
    out = Path(args.out)
    earlier = _earlier_outputs(out, NUMBERED_RESULT_FILE_NAME, args.overwrite, "results")
    image, mask = _open_image(args.image, "--image"), _open_image(args.mask, "--mask")
    pipeline, low_noise_dtype, precision_note = load_sampler(args)
    _check_steps(pipeline, [args.steps])
    inpainter = FaceDiffInpaintPipeline(unet=pipeline.unet, scheduler=pipeline.scheduler)
    original, kept = inpainter.preprocess(image), 1 - inpainter.preprocess_mask(mask, image, 1)  # checks the mask
    print(precision_note, file=sys.stderr)
    results = inpainter(
        image=[image] * args.num_images,
        mask_image=mask,
        num_inference_steps=args.steps,
        jump_length=args.jump_length,
        jump_n_sample=args.jump_n_sample,
        generator=[torch.Generator().manual_seed(args.seed + index) for index in range(args.num_images)],
        low_noise_dtype=low_noise_dtype,
    ).images
    # The part repainted shows as mid-gray, 0 in the model's [-1, 1].
    strip = inpainter.postprocess(torch.cat([original, original * kept]), "pil") + results
    images = {f"{index:05d}.png": result for index, result in enumerate(results)}
    return _write_outputs(out, {**images, "strip.png": _strip(strip)}, earlier)


def edit(args: argparse.Namespace) -> Path:
    """
    Noise `args.image` to each strength and denoise it (SDEdit), all with seed `args.seed`: write one result per
    strength and a strip: the image as the model sees it, then the results.

    Args:
        args (`argparse.Namespace`):
            `model`, `image`, `strength` (a list), `steps`, `seed`, `out`, `overwrite`, and the sampler options that
            `load_sampler` reads.

    Returns:
        `Path`: the strip.
    """
    out = Path(args.out)
    earlier = _earlier_outputs(out, EDIT_FILE_NAME, args.overwrite, "results")
    image = _open_image(args.image, "--image")
    pipeline, low_noise_dtype, precision_note = load_sampler(args)
    _check_steps(pipeline, [args.steps])
    editor = FaceDiffImg2ImgPipeline(unet=pipeline.unet, scheduler=pipeline.scheduler)
    print(precision_note, file=sys.stderr)
    results = {}
    for strength in dict.fromkeys(args.strength):
        generator = torch.Generator().manual_seed(args.seed)
        edited = editor(
            image=image,
            strength=strength,
            num_inference_steps=args.steps,
            generator=generator,
            low_noise_dtype=low_noise_dtype,
        )
        results[f"strength-{strength:g}.png"] = edited.images[0]
    strip = editor.postprocess(editor.preprocess(image), "pil") + list(results.values())
    return _write_outputs(out, {**results, "strip.png": _strip(strip)}, earlier)


def interpolate(args: argparse.Namespace) -> Path:
    """
    Write `args.frames` frames between two images (DDIM-inverted) or two seeds, and a strip of them.

    Args:
        args (`argparse.Namespace`):
            `model`, `image` (two paths) or `seeds` (two seeds), `frames`, `steps`, `out`, `overwrite`, and the
            model options that `load_sampler` reads.

    Returns:
        `Path`: the strip.
    """
    out = Path(args.out)
    if args.image is not None and len(args.image) != 2:
        raise ValueError(
            f"--image was given {len(args.image)} time(s): pass two images (--image A --image B), or --seeds S1 S2."
        )
    earlier = _earlier_outputs(out, NUMBERED_RESULT_FILE_NAME, args.overwrite, "frames")
    images = [_open_image(path, "--image") for path in args.image] if args.image is not None else None
    pipeline, low_noise_dtype, precision_note = load_sampler(args)
    _check_steps(pipeline, [args.steps])
    interpolator = FaceDiffInterpolationPipeline(unet=pipeline.unet, scheduler=pipeline.scheduler)
    generators = [torch.Generator().manual_seed(seed) for seed in args.seeds] if images is None else None
    print(precision_note, file=sys.stderr)
    frames = interpolator(
        image=images,
        generator=generators,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        low_noise_dtype=low_noise_dtype,
    ).images
    written = {f"{index:05d}.png": frame for index, frame in enumerate(frames)}
    return _write_outputs(out, {**written, "strip.png": _strip(frames)}, earlier)


def export(args: argparse.Namespace) -> tuple[Path, int]:
    """
    Save a training checkpoint's weights as a pipeline folder.

    Args:
        args (`argparse.Namespace`):
            `checkpoint` (a `checkpoint-<step>` folder or a training output folder), `out`, `weights` (`ema` or
            `trained`) and `overwrite` (replace a pipeline already in `out`).

    Returns:
        `tuple[Path, int]`: the pipeline folder and the checkpoint's step.
    """
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: pass a folder for the pipeline.")
    if (out / "training_args.json").is_file() or list_checkpoints(out):
        raise ValueError(f"{out} is a training output folder, whose pipeline and card are its run's: pass another one.")
    if (out / "model_index.json").is_file() and not args.overwrite:
        raise ValueError(f"{out} already holds a pipeline: pass --overwrite to replace it, or another folder.")
    pipeline, step = export_checkpoint(args.checkpoint, args.weights)
    pipeline.save_pretrained(out)
    return out, step


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
    pipeline, low_noise_dtype, precision_note = load_sampler(args)
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
            pipeline,
            args.num_images,
            steps,
            args.seed,
            args.batch_size,
            "np",
            MEMORY_FORMATS[args.memory_format],
            low_noise_dtype=low_noise_dtype,
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


def load_sampler(args: argparse.Namespace) -> tuple[FaceDiffPipeline, torch.dtype | None, str]:
    """
    The pipeline of `args.model` on its device and in its precision, with the sampler options applied, the half
    precision for the low-noise half of its chain (every command's pipeline takes it as `low_noise_dtype`), and a
    line that says which precision and why.

    Args:
        args (`argparse.Namespace`):
            `model`, `device`, `dtype`, `variance_type`, `eta`, `clip_sample` (scheduler options; `None` keeps the
            saved ones), `threads`, `memory_format` and `compile`.

    Returns:
        `tuple[FaceDiffPipeline, torch.dtype | None, str]`
    """
    device = _device(args)  # a bad --device fails before the model is read
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype, low_noise_dtype = DTYPES.get(args.dtype, torch.float32), None
    if args.dtype != "auto":
        precision_note = f"Sampling in {args.dtype} (--dtype)."
    else:
        low_noise_dtype, reason = sampling_precision(device)
        precision_note = f"Sampling in {reason}; --dtype float32 or bfloat16 overrides."
    pipeline = FaceDiffPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    # `facediff interpolate` has none of these: it decodes with DDIM.
    scheduler_options = {name: getattr(args, name, None) for name in ("variance_type", "eta", "clip_sample")}
    scheduler_options = {name: value for name, value in scheduler_options.items() if value is not None}
    if scheduler_options:
        pipeline.scheduler = FaceDiffScheduler.from_config(pipeline.scheduler.config, **scheduler_options)
    if args.compile:
        # On a GPU, CUDA graphs ("reduce-overhead") also remove the launch gaps between a step's many small kernels.
        mode = "reduce-overhead" if pipeline.device.type == "cuda" else "default"
        pipeline.unet = torch.compile(pipeline.unet, mode=mode)
    return pipeline, low_noise_dtype, precision_note


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facediff", description="Sample from, evaluate and edit images with facediff DDPM pipelines."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    # How every command runs the model.
    model_options = argparse.ArgumentParser(add_help=False)
    model_options.add_argument("--device", default=None, help="cpu, cuda, mps, ...; default: cuda when available")
    model_options.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="the UNet's precision (the sampling chain stays float32); auto: float32, and for `sample` and `eval` "
        "bfloat16 below t = T/2 where the CPU or GPU computes it natively (AMX, AVX512-BF16, recent GPUs)",
    )
    model_options.add_argument("--threads", type=_positive, default=None, help="CPU threads; default: torch's")
    model_options.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (with CUDA graphs on a GPU) after about a minute's compile: 1.35-1.56x the "
        "stock pipeline's speed on a 2-core CPU, 1.72x on an H100 in fp16",
    )
    # The commands that run the model's own sampler (all but interpolate, which decodes with DDIM).
    chain_options = argparse.ArgumentParser(add_help=False)
    chain_options.add_argument(
        "--variance-type", choices=["fixed_large", "fixed_small"], default=None, help="default: the saved scheduler's"
    )
    chain_options.add_argument("--eta", type=float, default=None, help="DDIM eta in [0, 1] on the same chain")
    chain_options.add_argument(
        "--clip-sample",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="clip each step's x_0 prediction to [-1, 1] (advised with --eta 0); default: the saved scheduler's",
    )
    sampler_options = argparse.ArgumentParser(add_help=False, parents=[model_options, chain_options])
    sampler_options.add_argument(
        "--memory-format",
        choices=list(MEMORY_FORMATS),
        default="auto",
        help="tensor layout while sampling; auto: channels_last on a CPU, contiguous on a GPU (faster on each)",
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

    model_help = "a pipeline folder or a Hub repo id (user/name)"
    overwrite_help = "replace the results that an earlier run left in --out"
    inpainter = commands.add_parser(
        "inpaint", parents=[model_options, chain_options], help="fill in the white part of a mask (RePaint)"
    )
    inpainter.add_argument("model", help=model_help)
    inpainter.add_argument("--image", required=True, help="the image: any mode and size, converted as in training")
    inpainter.add_argument("--mask", required=True, help="the image's size: white where to repaint, black to keep")
    inpainter.add_argument("--num-images", type=_positive, default=1, help="results, result i with seed + i")
    inpainter.add_argument("--steps", type=_positive, default=None, help="respaced sampling steps; default: all T")
    inpainter.add_argument("--jump-length", type=_positive, default=10, help="RePaint's steps per jump back up")
    inpainter.add_argument(
        "--jump-n-sample", type=_positive, default=10, help="RePaint's runs of each stretch (1: no resampling)"
    )
    inpainter.add_argument("--seed", type=int, default=0)
    inpainter.add_argument("--out", required=True, help="folder for 00000.png, ... and strip.png")
    inpainter.add_argument("--overwrite", action="store_true", help=overwrite_help)

    editor = commands.add_parser(
        "edit", parents=[model_options, chain_options], help="noise an image part of the way and denoise it (SDEdit)"
    )
    editor.add_argument("model", help=model_help)
    editor.add_argument("--image", required=True, help="the image: any mode and size, converted as in training")
    editor.add_argument(
        "--strength",
        type=_fraction,
        nargs="+",
        default=[0.5],
        help="how far to noise, in [0, 1], one result each: 0 returns the image, 1 draws a new one; default: 0.5",
    )
    editor.add_argument("--steps", type=_positive, default=None, help="respaced sampling steps; default: all T")
    editor.add_argument("--seed", type=int, default=0)
    editor.add_argument("--out", required=True, help="folder for strength-S.png and strip.png")
    editor.add_argument("--overwrite", action="store_true", help=overwrite_help)

    interpolator = commands.add_parser(
        "interpolate", parents=[model_options], help="frames between two images (DDIM-inverted) or two seeds"
    )
    interpolator.add_argument("model", help=model_help)
    ends = interpolator.add_mutually_exclusive_group(required=True)
    ends.add_argument("--image", action="append", help="an end: pass it twice (--image A --image B)")
    ends.add_argument("--seeds", type=int, nargs=2, metavar=("S1", "S2"), help="two seeds, whose noises are the ends")
    interpolator.add_argument("--frames", type=_positive_pair, default=8, help="frames, both ends included")
    interpolator.add_argument("--steps", type=_positive, default=50, help="DDIM steps; default: 50")
    interpolator.add_argument("--out", required=True, help="folder for 00000.png, ... and strip.png")
    interpolator.add_argument("--overwrite", action="store_true", help=overwrite_help)

    exporter = commands.add_parser("export", help="save a training checkpoint's weights as a pipeline")
    exporter.add_argument("checkpoint", help="a checkpoint-<step> folder, or a training output folder for its latest")
    exporter.add_argument("out", help="the pipeline folder to write")
    exporter.add_argument(
        "--weights",
        choices=["ema", "trained"],
        default="ema",
        help="ema: the moving average, what training saves (default); trained: the optimizer's weights",
    )
    exporter.add_argument("--overwrite", action="store_true", help="replace a pipeline already in OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # this process is ours: reuse freed tensor memory rather than fault in fresh pages
    try:
        if args.command == "sample":
            grid = sample(args)
            print(f"Wrote {args.num_images} images and {grid}")
        elif args.command == "export":
            out, step = export(args)
            print(f"Wrote the {args.weights} weights of step {step} as a pipeline in {out}")
        elif args.command in EDITING_COMMANDS:
            strip = EDITING_COMMANDS[args.command](args)
            print(f"Wrote {strip} and the images in it")
        else:
            results, out, card = evaluate(args)
            print(evaluation_table(results))
            print(f"Wrote {out}" + (f" and refreshed {card}" if card is not None else ""))
    except (ValueError, OSError) as error:
        print(f"error: {error}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


EDITING_COMMANDS = {"inpaint": inpaint, "edit": edit, "interpolate": interpolate}


def _earlier_outputs(out: Path, file_name: re.Pattern, overwrite: bool, what: str) -> list[Path]:
    """
    The files a command's earlier run left in `out`, which it replaces with `overwrite` and refuses to mix with new
    ones otherwise (a shorter run would leave old ones beside the new); `out` must be a folder or not exist yet.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: pass a folder for the PNGs.")
    earlier = sorted(path for path in out.glob("*.png") if file_name.fullmatch(path.name))
    if earlier and not overwrite:
        names = ", ".join(path.name for path in earlier[:2]) + (", ..." if len(earlier) > 2 else "")
        raise ValueError(
            f"--out {out} already holds {what} ({names}): choose a new or empty --out, or pass --overwrite to "
            "replace them."
        )
    return earlier


def _write_outputs(out: Path, images: dict[str, Image.Image], earlier: list[Path]) -> Path:
    """Replace the `earlier` outputs with `images`, written whole beside `out`'s entries and renamed into place, so
    that no PNG is ever half-written; returns the strip."""
    for path in earlier:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".facediff-staging-", dir=out))
    try:
        for name, image in images.items():
            image.save(staging / name)
        replace_entries(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "strip.png"


def _open_image(path: str, flag: str) -> Image.Image:
    """The image file `path`, decoded, or one line naming the flag, the problem and the fix."""
    if not Path(path).is_file():
        problem = "is a folder" if Path(path).is_dir() else "does not exist"
        raise ValueError(f"{flag} {path} {problem}: pass an image file (PNG, JPEG, ...).")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except OSError as error:  # PIL's UnidentifiedImageError and truncated files
        raise ValueError(
            f"{flag} {path} is not an image PIL can read ({type(error).__name__}): pass a PNG, JPEG, ... file."
        ) from error


def _strip(images: list[Image.Image]) -> Image.Image:
    """Images side by side, in one row."""
    return make_image_grid(images, rows=1, cols=len(images))


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


def _fraction(text: str) -> float:
    """A number in [0, 1]; argparse names the option."""
    message = f"{text!r} is not a number in [0, 1] (0 returns the image, 1 draws a new one)"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(message)
    return value


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
