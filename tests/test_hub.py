"""Hub sharing, with the network calls intercepted at huggingface_hub's HfApi boundary."""

import shutil

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl

from facediff import FaceDiffPipeline
from facediff.training import train
from facediff.training_args import parse_training_arguments

from .conftest import OLIVETTI, lay_out_as_hub_cache

TOKEN = "hf_thisIsNotARealTokenButMustNeverBeWritten"


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Record create_repo and create_commit, and keep the committed files as the Hub would."""
    hub = {"repos": [], "commits": [], "files": tmp_path / "hub-files"}

    def create_repo(self, repo_id, **kwargs):
        hub["repos"].append((repo_id, kwargs.get("private"), self.token))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        hub["commits"].append((repo_id, commit_message, sorted(op.path_in_repo for op in operations)))
        for op in operations:
            target = hub["files"] / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, target)
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0123abcd",
            commit_message=commit_message,
            commit_description="",
            oid="0123abcd",
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return hub


def test_training_pushes_exactly_the_pipeline_and_it_loads_back(tmp_path, fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    output = tmp_path / "faces"
    flags = ["--output_dir", str(output), "--train_data_dir", str(OLIVETTI), "--max_train_samples", "16",
             "--resolution", "16", "--train_batch_size", "8", "--max_train_steps", "2", "--checkpointing_steps", "1",
             "--eval_batch_size", "4", "--num_inference_steps", "2", "--push_to_hub", "--hub_model_id",
             "someone/faces", "--hub_private_repo"]  # fmt: skip
    try:
        train(parse_training_arguments(flags))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)

    assert [repo[:2] for repo in fake_hub["repos"]] == [("someone/faces", True)]
    ((repo_id, message, files),) = fake_hub["commits"]
    assert repo_id == "someone/faces" and message == "Upload facediff pipeline"
    assert files == [
        "README.md",
        "model_index.json",
        "pipeline_facediff.py",
        "sample_grid.png",
        "scheduler/scheduler_config.json",
        "scheduler/scheduling_facediff.py",
        "scheduling_facediff.py",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    assert (output / "checkpoint-1").is_dir()  # kept locally, never uploaded

    written = [path.read_bytes() for path in output.rglob("*") if path.is_file()]
    captured = capsys.readouterr()
    assert not any(TOKEN.encode() in content for content in written)
    assert TOKEN not in captured.out + captured.err

    lay_out_as_hub_cache(fake_hub["files"], tmp_path / "cache", "someone/faces")
    loaded = FaceDiffPipeline.from_pretrained("someone/faces", cache_dir=tmp_path / "cache")
    local = FaceDiffPipeline.from_pretrained(output)

    def draw(pipeline):
        return pipeline(num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images

    np.testing.assert_array_equal(draw(loaded), draw(local))


def test_a_loaded_pipeline_pushes_its_card_and_grid_and_a_new_one_a_rendered_card(gray_pipeline, tmp_path, fake_hub):
    folder = tmp_path / "trained"
    gray_pipeline.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlibrary_name: diffusers\n---\n# faces\n")
    (folder / "sample_grid.png").write_bytes(b"png")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"weights")
    (folder / "training_args.json").write_text("{}")

    FaceDiffPipeline.from_pretrained(folder).push_to_hub("someone/faces", commit_message="first")
    gray_pipeline.push_to_hub("someone/bare", private=True)
    (first, second) = fake_hub["commits"]
    assert first[:2] == ("someone/faces", "first") and "README.md" in first[2] and "sample_grid.png" in first[2]
    assert not any(name.startswith("checkpoint") or name == "training_args.json" for name in first[2])
    assert second[0] == "someone/bare" and "model_index.json" in second[2] and "sample_grid.png" not in second[2]
    assert fake_hub["repos"][1][:2] == ("someone/bare", True)
    # The pipeline built in memory carries no card: one is rendered from its configs, with nothing made up.
    card = ModelCard.load(fake_hub["files"] / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "unconditional-image-generation"
    assert "facediff" in card.data.tags
    assert 'FaceDiffPipeline.from_pretrained("someone/bare")' in card.text
    assert "16x16 grayscale" in card.text and "betas linear from 0.0001 to 0.02" in card.text
    assert "## Training" not in card.text and "not recorded" in card.text
    assert "{{" not in card.text and "None" not in card.text
