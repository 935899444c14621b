"""The model card of a trained pipeline, rendered from the repository's `model_card.md` with
`huggingface_hub.ModelCard`. What is unknown is left out, never filled with a placeholder."""

import os
import platform
import sys
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData

TEMPLATE_NAME = "model_card.md"


def template_path() -> Path:
    """`model_card.md` beside the package (a source checkout) or under `<prefix>/share/facediff` (a wheel)."""
    for candidate in (
        Path(__file__).resolve().parent.parent / TEMPLATE_NAME,
        Path(sys.prefix) / "share" / "facediff" / TEMPLATE_NAME,
    ):
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
            `wall_time`, `sample_grid` (a relative path, or None) and, when evaluated, `evaluation_table` and
            `eval_results` (a list of `huggingface_hub.EvalResult`).

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
    )
    return ModelCard.from_template(card_data, template_path=str(template_path()), **facts)


def write_model_card(facts: dict, folder: str | os.PathLike) -> Path:
    """Render the card into `folder/README.md`, atomically; returns its path."""
    path = Path(folder) / "README.md"
    partial = path.with_name(".README.md.partial")
    partial.write_text(str(render_model_card(facts)), encoding="utf-8")
    os.replace(partial, path)
    return path


def training_card_facts(args, accelerator, unet, scheduler, global_step, channels, num_images, wall_time) -> dict:
    """What the card says about a finished training run: data, model, schedule, optimisation, hardware, time."""
    config = scheduler.config
    if config.beta_schedule == "linear":
        beta_description = f"betas linear from {config.beta_start:g} to {config.beta_end:g}"
    else:
        beta_description = "the cosine schedule of Nichol & Dhariwal (2021)"
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
    return {
        "model_name": Path(args.output_dir).resolve().name,
        "repo_id": args.hub_model_id or Path(args.output_dir).resolve().name,
        "dataset_description": dataset_description,
        "dataset_id": args.dataset_name if args.dataset_name and not Path(args.dataset_name).exists() else None,
        "num_images": num_images,
        "resolution": args.effective_resolution,
        "channels": channels,
        "random_flip": args.random_flip,
        "model_preset": None if args.model_config_name_or_path else args.model_preset,
        "num_parameters": f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M",
        "num_train_timesteps": config.num_train_timesteps,
        "beta_description": beta_description,
        "prediction_description": {
            "epsilon": "the added noise (epsilon)",
            "v_prediction": "the velocity v",
            "sample": "the clean image x_0",
        }[config.prediction_type],
        "variance_description": "sqrt(beta_t)",
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


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
