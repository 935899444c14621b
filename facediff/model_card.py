"""The model card of a trained pipeline, rendered from the repository's `model_card.md` with
`huggingface_hub.ModelCard`. What is unknown is left out, never filled with a placeholder."""

import os
import sys
from pathlib import Path

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
