"""A run that watches itself (`--eval_steps`): every N steps a small batch of samples, drawn with fixed seeds, is scored
against the training images, so that the run shows how its quality moves and notices when the model starts to copy
its training faces.

What a run keeps of it in its output folder:

- `eval_log.jsonl`: one JSON object per evaluation (the step, the sample count, the sampling steps and the scores),
  in step order;
- `best_eval.safetensors` (with `--save_best`): the weights of the best evaluation so far, its step and score in the
  file's metadata; each checkpoint keeps the one of its step;
- `eval_curve.png`: the scores against the step, drawn at the end for the model card.

A resume from checkpoint-k rewinds the log and the best weights to step k (`rewind_evaluations`): the steps after it
are trained and evaluated again, and their first evaluations belong to a tail of the run that no longer exists.
"""

import json
import logging
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .atomic_files import atomic_copy, atomic_write
from .checkpointing import checkpoint_step
from .data import PIXELS
from .evaluation import SampleEvaluator
from .pipelines import FaceDiffScheduler
from .sample_grids import draw, sampling_pipeline, sampling_unet

logger = logging.getLogger(__name__)

EVAL_LOG_NAME = "eval_log.jsonl"
BEST_EVAL_NAME = "best_eval.safetensors"
EVAL_CURVE_NAME = "eval_curve.png"
# What each evaluation records of `SampleEvaluator.score`.
SCORES = ("pixel_pca_fd", "pixel_pca_kid_mean", "pixel_pca_kid_std", "memorised_share", "high_frequency_ratio")
# --save_best keeps the lowest: KID is unbiased at a few dozen samples, where the FD's bias hides small changes.
BEST_SCORE = "pixel_pca_kid_mean"
# The reference is at most this many training images, a seeded subset, so that the fit and each memorisation check
# stay cheap on a large data set.
MAX_REFERENCE_IMAGES = 2000
# A model that copies nothing scores about 1% (evaluation.MEMORISATION_PERCENTILE); 64 such samples stay under 5%
# but in a few evaluations in a thousand.
MEMORISATION_WARNING_SHARE = 0.05


def training_reference(train_dataset, seed: int, max_images: int = MAX_REFERENCE_IMAGES) -> torch.Tensor:
    """
    The training images the evaluations compare samples with, as training reads them (decoded, cropped, resized).

    Args:
        train_dataset (`datasets.Dataset`):
            The preprocessed training images (`data.preprocess_images`).
        seed (`int`):
            Draws the subset when there are more than `max_images`.
        max_images (`int`, defaults to `MAX_REFERENCE_IMAGES`):
            Keep at most this many, a random subset.

    Returns:
        `torch.Tensor`: uint8 (N, C, H, W).
    """
    if len(train_dataset) > max_images:
        # Its own generator: the global RNG belongs to training, and a resumed run must draw as a straight one does.
        chosen = torch.randperm(len(train_dataset), generator=torch.Generator().manual_seed(seed))[:max_images]
        train_dataset = train_dataset.select(chosen.sort().values.tolist())
    pixels = train_dataset[:][PIXELS]
    return pixels if pixels.dtype == torch.uint8 else pixels.round().to(torch.uint8)  # --preserve_input_precision


def sample_pixels(
    unet: UNet2DModel,
    scheduler: FaceDiffScheduler,
    num_images: int,
    num_inference_steps: int,
    seed: int,
    batch_size: int,
    ema: EMAModel | None = None,
    low_noise_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """
    Draw images with the EMA weights when given, as `facediff eval` draws them: image i from its own generator seeded
    `seed + i`, so it is the same image whatever the batch size; `unet`'s own weights and training mode are kept.

    Args:
        unet (`UNet2DModel`):
            The (unwrapped) model being trained.
        scheduler (`FaceDiffScheduler`):
            The training scheduler; sampling uses a copy, so its state is untouched.
        num_images (`int`):
            How many images.
        num_inference_steps (`int`):
            Respaced sampling steps.
        seed (`int`):
            Seed of image 0 (the global RNG is not touched, so resuming stays exact).
        batch_size (`int`):
            Images per pipeline call.
        ema (`EMAModel`, *optional*):
            Averaged weights to sample with.
        low_noise_dtype (`torch.dtype`, *optional*):
            Half precision for the low-noise half of the chain (the pipeline's `low_noise_dtype`).

    Returns:
        `torch.Tensor`: uint8 (N, C, H, W) on the CPU, rounded as the pipeline's PIL images are.
    """
    batches = draw(
        sampling_pipeline(unet, scheduler, ema),
        num_images,
        num_inference_steps,
        seed,
        batch_size,
        "pt",
        show_progress=False,
        low_noise_dtype=low_noise_dtype,
    )
    return torch.cat([images.mul(255).round().to(torch.uint8).cpu() for _, images in batches])


class TrainingEvaluator:
    """
    Evaluates the model being trained and keeps the record: the log, the best weights (with `--save_best`) and the
    warning when samples copy training images. Lives on the main process only.

    Args:
        scorer (`SampleEvaluator`):
            Fitted on the training images (`training_reference`), without the Inception network.
        args (`TrainingArguments`):
            `eval_num_images`, `eval_inference_steps`, `seed`, `train_batch_size` (images per sampling batch: what
            fits in training fits in sampling, which keeps no activations for a backward pass) and `save_best`.
        output_dir (`Path`):
            The run's folder, as `rewind_evaluations` left it.
        low_noise_dtype (`torch.dtype`, *optional*):
            The run's half precision, to sample the low-noise half of each chain in (the pipeline's
            `low_noise_dtype`); the rest is float32.
    """

    def __init__(self, scorer: SampleEvaluator, args, output_dir: Path, low_noise_dtype: torch.dtype | None = None):
        self.scorer = scorer
        self.low_noise_dtype = low_noise_dtype
        self.args = args
        self.output_dir = output_dir
        self.records = read_eval_log(output_dir)
        self.best = read_best_eval(output_dir) if args.save_best else None

    @property
    def last_step(self) -> int | None:
        """The step of the latest evaluation, None before the first."""
        return self.records[-1]["step"] if self.records else None

    def evaluate(
        self,
        unet: UNet2DModel,
        scheduler: FaceDiffScheduler,
        ema: EMAModel | None,
        step: int,
        train_seconds: float,
    ) -> dict:
        """
        Sample, score, append to `eval_log.jsonl`, keep the weights if they are the best so far, and warn when the
        model copies its training images.

        Args:
            unet (`UNet2DModel`):
                The (unwrapped) model being trained.
            scheduler (`FaceDiffScheduler`):
                The training scheduler.
            ema (`EMAModel`, *optional*):
                The averaged weights, which are the ones evaluated (and saved at the end) when given.
            step (`int`):
                The optimizer step just taken.
            train_seconds (`float`):
                Seconds of training up to this step, recorded as `train_minutes` to plot quality against time.

        Returns:
            `dict`: the record written: `step`, `train_minutes`, `num_images`, `inference_steps` and the `SCORES`.
        """
        args = self.args
        started = time.monotonic()
        samples = sample_pixels(
            unet,
            scheduler,
            args.eval_num_images,
            args.eval_inference_steps,
            args.seed,
            args.train_batch_size,
            ema,
            self.low_noise_dtype,
        )
        scores = self.scorer.score(samples)
        record = {
            "step": step,
            "train_minutes": round(train_seconds / 60, 4),
            "num_images": args.eval_num_images,
            "inference_steps": args.eval_inference_steps,
        }
        record.update({name: scores[name] for name in SCORES})
        self.records.append(record)
        write_eval_log(self.output_dir, self.records)
        if args.save_best and is_better(record, self.best):
            self.best = write_best_eval(self.output_dir, sampling_unet(unet, ema), record)
        logger.info(
            f"Evaluation at step {step} ({time.monotonic() - started:.1f} s): "
            f"pixel-PCA FD {record['pixel_pca_fd']:.3f}, "
            f"pixel-PCA KID {record['pixel_pca_kid_mean']:.4f} ± {record['pixel_pca_kid_std']:.4f}, "
            f"memorised {record['memorised_share']:.1%}, "
            f"high-frequency ratio {record['high_frequency_ratio']:.2f}"
        )
        if record["memorised_share"] > MEMORISATION_WARNING_SHARE:
            save_best = (
                " (--save_best keeps the best evaluation that does not copy)"
                if args.save_best
                else ", or pass --save_best to keep the best evaluation that does not copy"
            )
            logger.warning(
                f"At step {step}, {record['memorised_share']:.0%} of the evaluation's samples are copies of training "
                f"images (over {MEMORISATION_WARNING_SHARE:.0%}): the model is memorising its training faces, which "
                f"are real people's faces, and gives them out as new ones; train fewer steps or on more images"
                f"{save_best}."
            )
        return record


def is_better(record: dict, best: dict | None) -> bool:
    """Whether an evaluation beats the best so far for `--save_best`: a lower pixel-PCA KID, among evaluations whose
    samples copy training images no more than `MEMORISATION_WARNING_SHARE` (against the training images, copies
    score best of all)."""
    if record["memorised_share"] > MEMORISATION_WARNING_SHARE:
        return False
    return best is None or record[BEST_SCORE] < best[BEST_SCORE]


def read_eval_log(output_dir: Path) -> list[dict]:
    """The evaluations in `output_dir/eval_log.jsonl`, oldest first; none when there is no log."""
    path = output_dir / EVAL_LOG_NAME
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not one JSON object per line ({error}): restore it, or delete it to lose the evaluations it "
            "lists."
        ) from error


def write_eval_log(output_dir: Path, records: list[dict]) -> None:
    """Write `eval_log.jsonl` whole, atomically: one JSON object per evaluation and line."""
    with atomic_write(output_dir / EVAL_LOG_NAME) as partial:
        partial.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def read_best_eval(output_dir: Path) -> dict | None:
    """The step and score of `output_dir/best_eval.safetensors`, None when there is none."""
    path = output_dir / BEST_EVAL_NAME
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as weights:
        metadata = weights.metadata()
    return {"step": int(metadata["step"]), BEST_SCORE: float(metadata[BEST_SCORE])}


def write_best_eval(output_dir: Path, unet: UNet2DModel, record: dict) -> dict:
    """Save `unet`'s weights as `best_eval.safetensors`, atomically, with the evaluation's step and score; returns
    them as `read_best_eval` does."""
    best = {"step": record["step"], BEST_SCORE: record[BEST_SCORE]}
    weights = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in unet.state_dict().items()}
    with atomic_write(output_dir / BEST_EVAL_NAME) as partial:
        save_file(weights, partial, metadata={name: repr(value) for name, value in best.items()})
    return best


def load_best_eval(output_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of `output_dir/best_eval.safetensors`, a `UNet2DModel` state dict."""
    return load_file(output_dir / BEST_EVAL_NAME)


def rewind_evaluations(output_dir: Path, checkpoint: Path | None) -> None:
    """
    Make the evaluation files in `output_dir` those of the step training starts from: the log's evaluations after it
    are dropped, since those steps are trained and evaluated again, and the best weights are the ones `checkpoint`
    kept (none from step 0). Call on the main process, before the first step.

    Args:
        output_dir (`Path`):
            The run's folder.
        checkpoint (`Path`, *optional*):
            The checkpoint training resumes from; None for a run from step 0.
    """
    step = 0 if checkpoint is None else checkpoint_step(checkpoint)
    records = read_eval_log(output_dir)
    kept = [record for record in records if record["step"] <= step]
    if not kept:
        (output_dir / EVAL_LOG_NAME).unlink(missing_ok=True)
    elif len(kept) < len(records):
        write_eval_log(output_dir, kept)
    if checkpoint is not None and (checkpoint / BEST_EVAL_NAME).is_file():
        atomic_copy(checkpoint / BEST_EVAL_NAME, output_dir / BEST_EVAL_NAME)
    else:
        (output_dir / BEST_EVAL_NAME).unlink(missing_ok=True)


def plot_eval_curve(records: list[dict], path: Path, best_step: int | None = None) -> Path:
    """
    Draw the pixel-PCA KID and the memorised share against the minutes of training (against the step for a log
    written before they were recorded) as a PNG, atomically.

    Args:
        records (`list[dict]`):
            The evaluations, as `eval_log.jsonl` holds them.
        path (`Path`):
            Where the PNG goes.
        best_step (`int`, *optional*):
            The step whose weights were saved (`--save_best`), marked on both plots.

    Returns:
        `Path`
    """
    # matplotlib's object interface with the Agg canvas: no pyplot, so no global backend is set in the caller's
    # process (a notebook's, say).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # A resumed run's log may mix records with and without minutes: one axis for all of them.
    axis = "train_minutes" if all("train_minutes" in record for record in records) else "step"
    xs = [record[axis] for record in records]
    xlabel = "minutes of training" if axis == "train_minutes" else "step"
    figure = Figure(figsize=(9, 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    kid, memorised = figure.subplots(1, 2)
    kid.errorbar(
        xs,
        [record["pixel_pca_kid_mean"] for record in records],
        yerr=[record["pixel_pca_kid_std"] for record in records],
        marker="o",
        markersize=3,
        capsize=2,
    )
    kid.set(title="pixel-PCA KID against the training images", xlabel=xlabel, ylabel="KID (lower is closer)")
    shares = [100 * record["memorised_share"] for record in records]
    memorised.plot(xs, shares, marker="o", markersize=3)
    warning = 100 * MEMORISATION_WARNING_SHARE
    memorised.axhline(warning, color="red", linestyle="--", linewidth=1, label=f"warning ({warning:g}%)")
    memorised.set(title="samples that copy a training image", xlabel=xlabel, ylabel="memorised (%)")
    memorised.set_ylim(0, max(2 * warning, 1.1 * max(shares)))
    best_x = next((record[axis] for record in records if record["step"] == best_step), None)
    if best_x is not None:
        for axes in (kid, memorised):
            axes.axvline(best_x, color="green", linestyle=":", linewidth=1, label="saved (--save_best)")
    if axis == "step":
        for axes in (kid, memorised):
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    memorised.legend(loc="upper left")
    with atomic_write(path) as partial:
        figure.savefig(partial, format="png", dpi=100)
    return path
