"""The model card of a trained pipeline, rendered from the repository's `model_card.md` with
`huggingface_hub.ModelCard`. What is unknown is left out, never filled with a placeholder."""

import hashlib
import json
import logging
import os
import platform
import re
import sys
from pathlib import Path

import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .atomic_files import atomic_write
from .pipelines import FaceDiffScheduler

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "model_card.md"
EVAL_RESULTS_NAME = "eval_results.json"
# The files that decide what a saved pipeline draws, relative to its folder.
MODEL_FILE_PATTERNS = ("unet/*.safetensors", "unet/config.json", "scheduler/scheduler_config.json")
# (key in eval_results.json rows, model-index metric type, name)
EVAL_METRICS = (
    ("fid", "fid", "FID"),
    ("kid_mean", "kid", "KID"),
    ("pixel_pca_fd", "pixel-pca-fd", "pixel-PCA FD"),
    ("pixel_pca_kid_mean", "pixel-pca-kid", "pixel-PCA KID"),
    ("memorised_share", "memorised-share", "memorised share"),
    ("high_frequency_ratio", "high-frequency-ratio", "high-frequency ratio"),
)
# The During training table shows at most this many evaluations (evenly spread, with the last and the saved one);
# the curve shows them all.
MAX_TRAINING_EVALUATION_ROWS = 20


def template_path() -> Path:
    """
    `model_card.md` beside the package (a source checkout), or where a wheel's data files went:
    `<prefix>/share/facediff` of the prefix the package was installed under (a venv, `pip install --user`,
    `--prefix`), found by walking up from `<prefix>/lib/pythonX.Y/site-packages/facediff`, or of `sys.prefix`.
    """
    package = Path(__file__).resolve().parent
    candidates = [package.parent / TEMPLATE_NAME]
    candidates += [prefix / "share" / "facediff" / TEMPLATE_NAME for prefix in (*package.parents, Path(sys.prefix))]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{TEMPLATE_NAME} was not found beside the facediff package: reinstall facediff.")


def render_model_card(facts: dict) -> ModelCard:
    """
    Render the card.

    Args:
        facts (`dict`):
            What the template shows: `model_name`, `repo_id`, `dataset_description`, `dataset_id` (a Hub dataset,
            or None), `license` (or None), `resolution`, `channels`, scheduler and training settings, `hardware`,
            `wall_time`, `sample_grid` (a relative path, or None), `best_eval_step` (the step whose weights
            `--save_best` kept, or None); when evaluated during training, `training_evaluation_setup`,
            `training_evaluation_table` and `eval_curve` (see `training_evaluation_facts`); when evaluated by
            `facediff eval`, `evaluation_setup`, `evaluation_table` and `eval_results` (a list of
            `huggingface_hub.EvalResult`): see `evaluation_facts`.

    Returns:
        `huggingface_hub.ModelCard`
    """
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        tags=["ddpm", "facediff", "diffusers", "unconditional-image-generation"],
        datasets=[facts["dataset_id"]] if facts.get("dataset_id") else None,
        license=facts.get("license"),
        model_name=facts["model_name"],
        eval_results=facts.get("eval_results"),
        base_model=facts.get("base_model_id"),
    )
    return ModelCard.from_template(card_data, template_path=str(template_path()), **facts)


def write_model_card(facts: dict, folder: str | os.PathLike) -> Path:
    """Render the card into `folder/README.md`, atomically, with the folder's evaluation results when they are about
    the weights it holds; returns its path."""
    return _write_card(render_model_card({**evaluation_facts(folder), **facts}), folder)


def model_digest(folder: str | os.PathLike) -> str:
    """SHA-256 over a saved pipeline's UNet weights and config and its scheduler config."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(path for pattern in MODEL_FILE_PATTERNS for path in folder.glob(pattern)):
        digest.update(path.relative_to(folder).as_posix().encode())
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def evaluation_table(results: dict) -> str:
    """
    The results of `facediff eval` as a markdown table, one row per sampling step count.

    Args:
        results (`dict`):
            The content of `eval_results.json`.

    Returns:
        `str`
    """
    has_inception = "fid" in results["rows"][0]
    header = ["steps", *(["FID", "KID"] if has_inception else []), "pixel-PCA FD", "pixel-PCA KID", "memorised"]
    header.append("high-frequency ratio")
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for row in results["rows"]:
        cells = [str(row["steps"])]
        if has_inception:
            cells += [f"{row['fid']:.2f}", _kid(row, "kid")]
        cells += [f"{row['pixel_pca_fd']:.3f}", _kid(row, "pixel_pca_kid"), f"{row['memorised_share']:.1%}"]
        cells.append(_high_frequency_ratio(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _kid(row: dict, name: str) -> str:
    """A KID cell; results written before the pixel-PCA KID existed have none."""
    return f"{row[name + '_mean']:.4f} ± {row[name + '_std']:.4f}" if name + "_mean" in row else "n/a"


def _high_frequency_ratio(row: dict) -> str:
    """A high-frequency ratio cell; results written before it existed have none."""
    return f"{row['high_frequency_ratio']:.2f}" if "high_frequency_ratio" in row else "n/a"


def evaluation_facts(folder: str | os.PathLike) -> dict:
    """
    `evaluation_setup`, `evaluation_table` and `eval_results` for the card, from `folder/eval_results.json`; empty
    when there is no such file or it was written for other weights (an earlier run in the same folder, say).

    Args:
        folder (`str` or `os.PathLike`):
            A saved pipeline.

    Returns:
        `dict`
    """
    path = Path(folder) / EVAL_RESULTS_NAME
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        logger.warning("Leaving %s out of the model card: it is not JSON (%s).", path, error)
        return {}
    if results.get("model_digest") != model_digest(folder):
        logger.warning("Leaving %s out of the model card: it evaluated other weights; run facediff eval again.", path)
        return {}
    # The Hub reads `dataset.type` as a dataset id: a local folder's path there would name some other dataset.
    dataset_id = results.get("reference_dataset_id", _legacy_reference_dataset_id(results))
    return {
        "evaluation_setup": _evaluation_setup(results),
        "evaluation_table": evaluation_table(results),
        "eval_results": [
            EvalResult(
                task_type="unconditional-image-generation",
                dataset_type=dataset_id or "imagefolder",
                dataset_name=results["reference_name"],
                metric_type=metric_type,
                metric_value=round(row[key], 6),
                metric_name=f"{name} ({row['steps']} steps, {results['num_images']} samples)",
            )
            for row in results["rows"]
            for key, metric_type, name in EVAL_METRICS
            if key in row
        ],
    }


def _legacy_reference_dataset_id(results: dict) -> str | None:
    """The reference's Hub id in results written before `reference_dataset_id` was recorded: a Hub id was recorded
    as its own name, a folder by its name (a guess that takes a folder named as it was passed for a Hub id)."""
    return results["reference"] if results["reference_name"] == results["reference"] else None


def load_card(folder: str | os.PathLike) -> ModelCard:
    """
    The folder's card (`README.md`).

    Args:
        folder (`str` or `os.PathLike`):
            A saved pipeline with a `README.md`.

    Returns:
        `huggingface_hub.ModelCard`

    Raises:
        `ValueError`: naming the card and the fix, when its YAML metadata does not parse.
    """
    path = Path(folder) / "README.md"
    try:
        return ModelCard.load(path)
    except (yaml.YAMLError, ValueError) as error:
        problem = " ".join(str(error).split())
        raise ValueError(
            f"{path} has metadata that does not parse ({problem}): fix the YAML between the --- lines at its top, "
            "or pass --out FILE to leave the card alone."
        ) from error


def refresh_card_evaluation(folder: str | os.PathLike) -> Path:
    """
    Put the folder's evaluation results into its existing card (`README.md`): the `model-index` metadata and the
    Evaluation section, replaced or added; the rest of the card is kept as it is.

    Args:
        folder (`str` or `os.PathLike`):
            A saved pipeline with a `README.md`.

    Returns:
        `Path`: the card.
    """
    card = load_card(folder)
    facts = evaluation_facts(folder)
    card.data.eval_results = facts.get("eval_results")
    card.data.model_name = card.data.model_name or Path(folder).resolve().name
    text = re.sub(r"\n## Evaluation\n.*?(?=\n## |\Z)", "", card.text, flags=re.DOTALL).rstrip("\n") + "\n"
    if facts:
        text += f"\n## Evaluation\n\n{facts['evaluation_setup']}\n\n{facts['evaluation_table']}\n"
    card.text = text
    return _write_card(card, folder)


def _evaluation_setup(results: dict) -> str:
    sampler = (
        f"`variance_type` {results['variance_type']}"
        + ("" if results["eta"] is None else f", eta {results['eta']}")
        + (", x_0 clipped" if results.get("clip_sample") else "")
    )
    inception = (
        "FID and KID use the standard FID Inception's features. "
        if "fid" in results["rows"][0]
        else "FID and KID were left out (run without the Inception weights). "
    )
    return (
        f"{results['num_images']} samples per row (seed {results['seed']}, {sampler}) against "
        f"{results['num_reference']} images of `{results['reference_name']}`, by `facediff eval`. {inception}"
        f"Pixel-PCA FD is the Frechet distance between pixel statistics on the reference images' top "
        f"{results['pixel_pca_components']} principal components: it needs no download, and it is not comparable "
        f"with published FIDs; pixel-PCA KID is the unbiased kernel distance on the same features, near 0 for real "
        f"images at any sample count. Memorised is the share of samples closer to a reference image than "
        f"{100 - results['memorisation_percentile']:g}% of reference images are to their nearest other one."
    )


def _write_card(card: ModelCard, folder: str | os.PathLike) -> Path:
    path = Path(folder) / "README.md"
    with atomic_write(path) as partial:
        partial.write_text(str(card), encoding="utf-8")
    return path


def pipeline_model_card(pipeline, repo_id: str) -> ModelCard:
    """
    The card of a pipeline that carries none (built or changed in memory): what its configs say, the model, the
    schedule and the sampler, with no training or evaluation section, since nothing is known of them.

    Args:
        pipeline (`FaceDiffPipeline`):
            The pipeline to describe.
        repo_id (`str`):
            The Hub repo it goes to, for the usage snippets.

    Returns:
        `huggingface_hub.ModelCard`
    """
    return render_model_card(
        {"model_name": repo_id.split("/")[-1], **model_facts(pipeline.unet, pipeline.scheduler, repo_id)}
    )


def model_facts(unet, scheduler, repo_id: str) -> dict:
    """What the card says about the model and its diffusion schedule, read off the UNet and scheduler."""
    config = scheduler.config
    if config.beta_schedule == "linear":
        beta_description = f"betas linear from {config.beta_start:g} to {config.beta_end:g}"
    elif config.beta_schedule == "squaredcos_cap_v2":
        beta_description = "the cosine schedule of Nichol & Dhariwal (2021)"
    else:  # a diffusers scheduler's other schedules
        beta_description = f"the `{config.beta_schedule}` schedule from {config.beta_start:g} to {config.beta_end:g}"
    size = unet.config.sample_size
    return {
        "repo_id": repo_id,
        "resolution": size if isinstance(size, int) else size[0],
        "channels": unet.config.in_channels,
        "num_parameters": f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M",
        "num_train_timesteps": config.num_train_timesteps,
        "beta_description": beta_description,
        "prediction_description": {
            "epsilon": "the added noise (epsilon)",
            "v_prediction": "the velocity v",
            "sample": "the clean image x_0",
        }[config.prediction_type],
        "sampler_description": _sampler_description(scheduler),
    }


def _sampler_description(scheduler) -> str:
    """How the pipeline samples: our scheduler's update and noise, or the diffusers scheduler swapped in."""
    if not isinstance(scheduler, FaceDiffScheduler):
        return f"diffusers' `{type(scheduler).__name__}`"
    config = scheduler.config
    if config.eta is not None:
        return f"the DDIM update with eta {config.eta:g}"
    noise = {
        "fixed_large": "sqrt(beta_t)",
        "fixed_small": "the posterior's (beta-tilde)",
        "fixed_small_log": "the posterior's (beta-tilde)",
        "learned": "the model's (learned)",
        "learned_range": "the model's, learned between the posterior's and sqrt(beta_t) (Improved DDPM)",
    }[config.variance_type]
    if config.thresholding:
        x0_bound = ", x_0 dynamically thresholded"
    elif config.clip_sample:
        x0_bound = f", x_0 clipped to [-{config.clip_sample_range:g}, {config.clip_sample_range:g}]"
    else:
        x0_bound = ""
    return f"the DDPM reverse update with noise scale {noise}{x0_bound}"


def training_card_facts(args, accelerator, unet, scheduler, global_step, channels, num_images, wall_time) -> dict:
    """What the card says about a finished training run: data, model, schedule, optimisation, hardware, time."""
    if args.train_data_dir is not None:
        dataset_description = f"the image folder `{Path(args.train_data_dir).name}`"
    elif args.dataset_name is not None:
        dataset_description = f"the dataset `{args.dataset_name}`"
    else:
        dataset_description = "scikit-learn's handwritten digits (1,797 8x8 images, UCI ML hand-written digits)"
    processes = accelerator.num_processes
    if accelerator.device.type == "cuda":
        hardware = f"{processes} x {torch.cuda.get_device_name(accelerator.device)}"
    else:
        threads = torch.get_num_threads()
        hardware = f"{processes} CPU process{'es' if processes > 1 else ''} x {threads} threads, {_cpu_name()}"
    minutes = wall_time / 60
    base = args.pretrained_model_name_or_path
    return {
        **model_facts(unet, scheduler, args.hub_model_id or Path(args.output_dir).resolve().name),
        "model_name": Path(args.output_dir).resolve().name,
        "dataset_description": dataset_description,
        "dataset_id": args.dataset_name if args.dataset_name and not Path(args.dataset_name).exists() else None,
        "num_images": num_images,
        "resolution": args.effective_resolution,
        "channels": channels,
        "random_flip": args.random_flip,
        "model_preset": None if args.model_config_name_or_path or base else args.model_preset,
        "base_model": base,
        # The Hub's model tree reads base_model: a repo id, never a local path.
        "base_model_id": None if base is None or os.path.isdir(base) else base,
        "global_step": global_step,
        "total_batch_size": args.train_batch_size * args.gradient_accumulation_steps,
        "learning_rate": f"{args.learning_rate:g}",
        "lr_scheduler": args.lr_scheduler,
        "lr_warmup_steps": args.lr_warmup_steps,
        "snr_gamma": args.snr_gamma,
        "use_ema": args.use_ema,
        "ema_max_decay": args.ema_max_decay,
        "mixed_precision": accelerator.mixed_precision if accelerator.mixed_precision != "no" else "float32",
        "hardware": hardware,
        "wall_time": f"{minutes:.1f} minutes" if minutes < 120 else f"{minutes / 60:.1f} hours",
        "sample_grid_caption": f"{args.eval_batch_size} samples, seed {args.seed}, "
        f"{args.num_inference_steps} respaced steps.",
    }


def training_evaluation_facts(
    args, evaluations: list[dict], num_training_images: int, eval_curve: str, best_step: int | None
) -> dict:
    """
    What the card's During training section says: `training_evaluation_setup`, `training_evaluation_table` and
    `eval_curve`.

    Args:
        args (`TrainingArguments`):
            The run's settings (`seed`, `use_ema`, `random_flip`).
        evaluations (`list[dict]`):
            The run's evaluations, as `eval_log.jsonl` holds them; at least one.
        num_training_images (`int`):
            The training set's size.
        eval_curve (`str`):
            The curve's PNG, relative to the card.
        best_step (`int`, *optional*):
            The evaluation whose weights were saved (`--save_best`).

    Returns:
        `dict`
    """
    from .training_evaluation import MAX_REFERENCE_IMAGES, MEMORISATION_WARNING_SHARE

    sample_settings = {(record["num_images"], record["inference_steps"]) for record in evaluations}
    varied = len(sample_settings) > 1  # a resume changed --eval_num_images or --eval_inference_steps
    weights = "EMA" if args.use_ema else "trained"
    if varied:
        samples = (
            f"of samples drawn with seeds from {args.seed} ({weights} weights; how many, and in how many steps, below)"
        )
    else:
        ((num_images, steps),) = sample_settings
        seeds = f"seeds {args.seed} to {args.seed + num_images - 1}"
        samples = f"of {num_images} samples ({seeds}, {steps} respaced steps, {weights} weights)"
    reference = f"the {num_training_images} training images"
    if num_training_images > MAX_REFERENCE_IMAGES:
        reference = f"{MAX_REFERENCE_IMAGES} of the {num_training_images} training images (a seeded subset)"
    copies = "a training image or its mirror image" if args.random_flip else "a training image"
    setup = (
        f"{len(evaluations)} evaluation{'s' if len(evaluations) != 1 else ''} while training, each {samples} "
        f"scored against {reference} as `facediff eval --no-inception` scores samples: "
        f"pixel-PCA FD and KID, and the share of samples that copy {copies}. Against the training images a low KID "
        "means samples like the training faces, which copies are too: read it beside the memorised share."
    )
    if best_step is not None:
        setup += (
            f" The saved weights are those of step {best_step}: the lowest pixel-PCA KID among the evaluations that "
            f"copy no more than {MEMORISATION_WARNING_SHARE:.0%} of their samples (`--save_best`)."
        )
    return {
        "training_evaluation_setup": setup,
        "training_evaluation_table": _training_evaluation_table(evaluations, best_step, varied),
        "eval_curve": eval_curve,
    }


def _training_evaluation_table(evaluations: list[dict], best_step: int | None, with_sample_settings: bool) -> str:
    shown = evaluations
    if len(evaluations) > MAX_TRAINING_EVALUATION_ROWS:
        last = len(evaluations) - 1
        picks = {round(i * last / (MAX_TRAINING_EVALUATION_ROWS - 2)) for i in range(MAX_TRAINING_EVALUATION_ROWS - 1)}
        picks |= {index for index, record in enumerate(evaluations) if record["step"] == best_step}
        shown = [evaluations[index] for index in sorted(picks)]
    with_minutes = all("train_minutes" in record for record in evaluations)
    header = ["step", *(["minutes"] if with_minutes else [])]
    header += [*(["samples", "sampling steps"] if with_sample_settings else []), "pixel-PCA FD"]
    header += ["pixel-PCA KID", "memorised", "high-frequency ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for record in shown:
        cells = [f"**{record['step']}** (saved)" if record["step"] == best_step else str(record["step"])]
        if with_minutes:
            cells.append(f"{record['train_minutes']:.1f}")
        if with_sample_settings:
            cells += [str(record["num_images"]), str(record["inference_steps"])]
        cells += [f"{record['pixel_pca_fd']:.3f}", _kid(record, "pixel_pca_kid"), f"{record['memorised_share']:.1%}"]
        cells.append(_high_frequency_ratio(record))
        lines.append("| " + " | ".join(cells) + " |")
    if len(shown) < len(evaluations):
        lines.append(f"\n{len(shown)} of the {len(evaluations)} evaluations; the curve above shows them all.")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
