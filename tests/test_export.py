"""`facediff export`: a training checkpoint's weights as the pipeline the run would have saved at that step."""

import json
import shutil

import pytest
import torch
from accelerate.state import AcceleratorState

from facediff import FaceDiffPipeline
from facediff.cli import main
from facediff.training import train
from facediff.training_args import parse_training_arguments

from .conftest import FACES, folder_state, tiny_run

# A constant rate: the first two steps of a 4-step run are then those of a 2-step run.
DATA = ["--train_data_dir", str(FACES), "--max_train_samples", "16", "--lr_scheduler", "constant"]


def trained(output, *flags):
    train(parse_training_arguments(tiny_run(output, *DATA, *flags)))
    AcceleratorState._reset_state(reset_partial_state=True)
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run trained for 4 steps (checkpoints at 2 and 4) and for 2 steps."""
    folder = tmp_path_factory.mktemp("runs")
    return trained(folder / "four", "--max_train_steps", "4"), trained(folder / "two", "--max_train_steps", "2")


def weights(folder):
    return FaceDiffPipeline.from_pretrained(folder).unet.state_dict()


def same_config(exported, saved):
    return {**exported, "_name_or_path": None} == {**saved, "_name_or_path": None}


def assert_same_weights(exported, saved):
    assert exported.keys() == saved.keys()
    for name in saved:
        assert torch.equal(exported[name], saved[name]), name


def test_each_checkpoint_exports_the_pipeline_its_run_would_save_at_that_step(runs, tmp_path, capsys):
    four, two = runs
    assert main(["export", str(four / "checkpoint-4"), str(tmp_path / "step-4")]) == 0
    assert "ema weights of step 4" in capsys.readouterr().out
    assert main(["export", str(four / "checkpoint-2"), str(tmp_path / "step-2")]) == 0
    assert_same_weights(weights(tmp_path / "step-4"), weights(four))
    assert_same_weights(weights(tmp_path / "step-2"), weights(two))  # the 2-step run's EMA, saved by training
    exported, saved = FaceDiffPipeline.from_pretrained(tmp_path / "step-4"), FaceDiffPipeline.from_pretrained(four)
    for part in ("unet", "scheduler"):
        assert same_config(getattr(exported, part).config, getattr(saved, part).config)
    assert exported(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 1)


def test_a_run_folder_exports_its_latest_checkpoint(runs, tmp_path):
    four, _ = runs
    assert main(["export", str(four), str(tmp_path / "latest")]) == 0
    assert_same_weights(weights(tmp_path / "latest"), weights(four))


def test_trained_weights_and_a_run_without_ema(tmp_path, capsys):
    run = trained(tmp_path / "run", "--use_ema", "false")
    assert main(["export", str(run), str(tmp_path / "ema")]) == 2
    assert "has no EMA weights (trained with --use_ema false): export with --weights trained" in capsys.readouterr().err
    assert not (tmp_path / "ema").exists()
    assert main(["export", str(run), str(tmp_path / "trained"), "--weights", "trained"]) == 0
    assert_same_weights(weights(tmp_path / "trained"), weights(run))  # without EMA, training saves these


def test_an_existing_pipeline_is_replaced_only_with_overwrite(runs, tmp_path, capsys):
    four, _ = runs
    out = tmp_path / "out"
    assert main(["export", str(four / "checkpoint-2"), str(out)]) == 0
    before = folder_state(out)
    assert main(["export", str(four / "checkpoint-4"), str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {out} already holds a pipeline: pass --overwrite to replace it, or another folder."
    )
    assert folder_state(out) == before
    assert main(["export", str(four / "checkpoint-4"), str(out), "--overwrite"]) == 0
    assert_same_weights(weights(out), weights(four))


def test_bad_locations_give_one_line_and_write_nothing(runs, tmp_path, capsys):
    four, _ = runs
    (tmp_path / "file").write_text("not a folder")
    cases = [
        ([str(tmp_path / "empty"), str(tmp_path / "a")], "is neither a facediff checkpoint"),
        ([str(four / "checkpoint-4"), str(four)], "is a training output folder, whose pipeline and card are its run's"),
        ([str(four / "checkpoint-4"), str(tmp_path / "file")], "is a file: pass a folder for the pipeline."),
    ]
    (tmp_path / "empty").mkdir()
    for argv, message in cases:
        before = folder_state(tmp_path), folder_state(four)
        assert main(["export", *argv]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1
        assert (folder_state(tmp_path), folder_state(four)) == before


def test_a_checkpoint_saved_before_the_configs_were_kept_is_refused(runs, tmp_path, capsys):
    old = shutil.copytree(runs[0] / "checkpoint-4", tmp_path / "checkpoint-4")
    state = json.loads((old / "facediff_state.json").read_text())
    del state["pipeline_configs"]
    (old / "facediff_state.json").write_text(json.dumps(state))
    assert main(["export", str(old), str(tmp_path / "out")]) == 2
    assert "was saved before checkpoints kept the model's config: resume the run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
