"""Hub sharing, with the network calls intercepted at huggingface_hub's HfApi boundary."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.utils import hub_utils
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, RepoUrl

import facediff.training as training
from facediff import FaceDiffPipeline, model_card
from facediff.training import train
from facediff.training_args import parse_training_arguments

from .conftest import FACES, folder_state, lay_out_as_hub_cache

TOKEN = "hf_thisIsNotARealTokenButMustNeverBeWritten"


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Record create_repo and create_commit, and keep the committed files as the Hub would."""
    hub = {"repos": [], "commits": [], "files": tmp_path / "hub-files"}

    def create_repo(self, repo_id, **kwargs):
        repo_id = repo_id if "/" in repo_id else f"someone/{repo_id}"  # the Hub puts a bare name in your namespace
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

    # diffusers' own push calls huggingface_hub's module-level create_repo and upload_folder: the same two calls.
    def upload_folder(*, repo_id, folder_path, commit_message, **kwargs):
        files = sorted(path for path in Path(folder_path).rglob("*") if path.is_file())
        operations = [CommitOperationAdd(str(path.relative_to(folder_path)), str(path)) for path in files]
        return HfApi().create_commit(repo_id, operations, commit_message=commit_message)

    monkeypatch.setattr(hub_utils, "create_repo", lambda *args, **kwargs: HfApi().create_repo(*args, **kwargs))
    monkeypatch.setattr(hub_utils, "upload_folder", upload_folder)
    return hub


def test_training_pushes_exactly_the_pipeline_and_it_loads_back(tmp_path, fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    output = tmp_path / "faces"
    try:
        train(parse_training_arguments(hub_run(output, "--hub_private_repo")))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)

    assert [repo[:2] for repo in fake_hub["repos"]] == [("someone/faces", True)] * 2  # before training, at the push
    ((repo_id, message, files),) = fake_hub["commits"]
    assert repo_id == "someone/faces" and message == "Upload facediff pipeline"
    assert files == [
        "README.md",
        "image_io_facediff.py",
        "model_index.json",
        "pipeline_facediff.py",
        "pipeline_facediff_img2img.py",
        "pipeline_facediff_inpaint.py",
        "pipeline_facediff_interpolate.py",
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
    (folder / "eval_curve.png").write_bytes(b"png")
    (folder / "eval_log.jsonl").write_text("{}\n")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"weights")
    (folder / "training_args.json").write_text("{}")

    FaceDiffPipeline.from_pretrained(folder).push_to_hub("someone/faces", commit_message="first")
    gray_pipeline.push_to_hub("someone/bare", private=True)
    (first, second) = fake_hub["commits"]
    assert first[:2] == ("someone/faces", "first") and "README.md" in first[2] and "sample_grid.png" in first[2]
    assert "eval_curve.png" in first[2]  # the card's images go with it; the evaluations' log stays
    assert not any(
        name.startswith("checkpoint") or name in ("training_args.json", "eval_log.jsonl") for name in first[2]
    )
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


def test_a_pushed_card_names_the_repo_it_goes_to(gray_pipeline, tmp_path, fake_hub):
    # A card written for a local folder ("trained") tells readers to load that folder: on the Hub it must name
    # the repo, with the namespace the Hub adds to a bare name.
    folder = tmp_path / "trained"
    gray_pipeline.save_pretrained(folder)
    model_card.pipeline_model_card(gray_pipeline, "trained").save(folder / "README.md")
    assert 'FaceDiffPipeline.from_pretrained("trained")' in (folder / "README.md").read_text()

    FaceDiffPipeline.from_pretrained(folder).push_to_hub("faces")
    card = (fake_hub["files"] / "README.md").read_text()
    assert 'FaceDiffPipeline.from_pretrained("someone/faces")' in card
    assert 'DiffusionPipeline.from_pretrained("someone/faces", trust_remote_code=True)' in card
    assert '"trained"' not in card
    assert 'from_pretrained("trained")' in (folder / "README.md").read_text()  # the local card is left as it was


def test_push_uploads_the_weights_as_saved_with_a_variant(gray_pipeline, tmp_path, fake_hub):
    gray_pipeline.save_pretrained(tmp_path / "model", variant="fp16", push_to_hub=True, repo_id="someone/faces")
    local = sorted(str(path.relative_to(tmp_path / "model")) for path in (tmp_path / "model" / "unet").rglob("*"))
    ((_, _, pushed),) = fake_hub["commits"]
    assert local == ["unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"]
    assert [name for name in pushed if name.startswith("unet/")] == local
    loaded = FaceDiffPipeline.from_pretrained("someone/faces", cache_dir=lay_out(fake_hub, tmp_path), variant="fp16")
    assert type(loaded) is FaceDiffPipeline


def test_a_swapped_in_scheduler_is_pushed_and_described_as_itself(gray_pipeline, fake_hub):
    gray_pipeline.scheduler = DDIMScheduler.from_config(gray_pipeline.scheduler.config)
    gray_pipeline.push_to_hub("someone/faces-ddim")
    ((_, _, pushed),) = fake_hub["commits"]
    assert "scheduler/scheduling_facediff.py" not in pushed
    card = ModelCard.load(fake_hub["files"] / "README.md")
    assert "sampling uses diffusers' `DDIMScheduler`" in card.text


def lay_out(fake_hub, tmp_path):
    lay_out_as_hub_cache(fake_hub["files"], tmp_path / "cache", "someone/faces")
    return tmp_path / "cache"


def hub_run(output, *flags) -> list[str]:
    return ["--output_dir", str(output), "--train_data_dir", str(FACES), "--max_train_samples", "16",
            "--resolution", "16", "--train_batch_size", "8", "--max_train_steps", "2", "--checkpointing_steps", "1",
            "--eval_batch_size", "4", "--num_inference_steps", "2", "--push_to_hub", "--hub_model_id",
            "someone/faces", *flags]  # fmt: skip


def count_repos_at_each_step(monkeypatch, hub) -> list[int]:
    """For each batch trained, how many repos had been created by then."""
    repos_at_each_step = []
    loss = training._diffusion_loss

    def counting(*args):
        repos_at_each_step.append(len(hub["repos"]))
        return loss(*args)

    monkeypatch.setattr(training, "_diffusion_loss", counting)
    return repos_at_each_step


def test_the_hub_repo_is_created_before_training(tmp_path, fake_hub, monkeypatch):
    repos_at_each_step = count_repos_at_each_step(monkeypatch, fake_hub)
    try:
        train(parse_training_arguments(hub_run(tmp_path / "faces")))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert repos_at_each_step == [1, 1] and len(fake_hub["commits"]) == 1


def test_a_hub_repo_that_cannot_be_created_stops_the_run_before_training(tmp_path, monkeypatch):
    def create_repo(self, repo_id, **kwargs):
        raise OSError("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\nBad token.")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    repos_at_each_step = count_repos_at_each_step(monkeypatch, {"repos": []})
    before = folder_state(tmp_path)
    with pytest.raises(ValueError) as refused:
        try:
            train(parse_training_arguments(hub_run(tmp_path / "faces")))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    assert str(refused.value) == (
        "--push_to_hub: cannot create the Hub repo someone/faces (401 Client Error: Unauthorized for url: "
        "https://huggingface.co/api/repos/create): log in with `hf auth login` (or set HF_TOKEN) and check the "
        "network and --hub_model_id, or train without --push_to_hub."
    )
    assert repos_at_each_step == [] and folder_state(tmp_path) == before


def test_a_failed_push_says_where_the_pipeline_is_and_how_to_push_it(tmp_path, fake_hub, monkeypatch):
    def create_commit(self, repo_id, operations, **kwargs):
        raise OSError("Connection reset by peer")

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    output = tmp_path / "faces"
    with pytest.raises(OSError) as failed:
        try:
            train(parse_training_arguments(hub_run(output)))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    assert str(failed.value) == (
        f"The trained pipeline is saved in {output}, but pushing it to the Hub repo someone/faces failed (Connection "
        f"reset by peer): no need to train again, push the folder with "
        f'FaceDiffPipeline.from_pretrained("{output}").push_to_hub("someone/faces").'
    )
    assert FaceDiffPipeline.from_pretrained(output).unet.config.sample_size == 16


@pytest.mark.parametrize("prefix", ["venv", "userbase", "custom-prefix"])
def test_the_card_template_is_found_where_pip_puts_a_wheels_data_files(tmp_path, monkeypatch, prefix):
    # A wheel installs model_card.md as a data file under <prefix>/share/facediff, and the package under
    # <prefix>/lib/pythonX.Y/site-packages: for --user and --prefix installs that prefix is not sys.prefix.
    package = tmp_path / prefix / "lib" / "python3.11" / "site-packages" / "facediff"
    package.mkdir(parents=True)
    template = tmp_path / prefix / "share" / "facediff" / "model_card.md"
    template.parent.mkdir(parents=True)
    template.write_text("template")
    monkeypatch.setattr(model_card, "__file__", str(package / "model_card.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "elsewhere"))
    assert model_card.template_path() == template.resolve()
    template.unlink()
    with pytest.raises(FileNotFoundError, match="model_card.md was not found beside the facediff package"):
        model_card.template_path()


def test_the_remote_code_pipeline_pushes_itself_with_its_code(gray_pipeline, tmp_path, fake_hub):
    # A user without facediff saves with push_to_hub=True: the upload must carry the code, or the repo cannot load.
    gray_pipeline.save_pretrained(tmp_path / "model")
    remote = DiffusionPipeline.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert type(remote) is not FaceDiffPipeline and type(remote).__module__ != FaceDiffPipeline.__module__
    remote.save_pretrained(tmp_path / "again", push_to_hub=True, repo_id="someone/remote", private=True)

    ((repo_id, _, files),) = fake_hub["commits"]
    assert repo_id == "someone/remote" and fake_hub["repos"][-1][:2] == ("someone/remote", True)
    assert {"pipeline_facediff.py", "scheduling_facediff.py", "scheduler/scheduling_facediff.py"} <= set(files)
    assert (tmp_path / "again" / "pipeline_facediff.py").is_file()
    loaded = FaceDiffPipeline.from_pretrained(fake_hub["files"])
    assert torch.equal(loaded.unet.conv_in.weight, gray_pipeline.unet.conv_in.weight)
