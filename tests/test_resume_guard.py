"""Resuming refuses a folder or checkpoint saved by a different run, before anything is written."""

import dataclasses
import json
import shutil

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers.training_utils import EMAModel

import facediff.training as training
from facediff.output_dir import RESUMABLE_SETTINGS, RUN_DEFINING_SETTINGS
from facediff.training import train
from facediff.training_args import TrainingArguments, parse_training_arguments

from .conftest import FACES, RGB_FACES, TINY_GRAY_UNET, folder_state, record_batches, tiny_run

DATA = ["--train_data_dir", str(FACES), "--max_train_samples", "16", "--save_images_steps", "100",
        "--eval_batch_size", "1", "--num_inference_steps", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run that ended: its checkpoint-2 and its training_args.json both record its settings."""
    output = tmp_path_factory.mktemp("finished") / "run"
    train(parse_training_arguments(tiny_run(output, *DATA)))
    AcceleratorState._reset_state(reset_partial_state=True)
    return output


@pytest.fixture
def run(finished_run, tmp_path):
    """The finished run without its last step's checkpoint: resuming it starts from checkpoint-2, mid-run."""
    shutil.copytree(finished_run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    return tmp_path / "run"


def resume(output, *flags):
    return train(parse_training_arguments(tiny_run(output, *DATA, *flags, "--resume_from_checkpoint", "latest")))


def test_every_setting_is_either_run_defining_or_free_to_change_on_resume():
    names = {spec.name for spec in dataclasses.fields(TrainingArguments)}
    assert set(RUN_DEFINING_SETTINGS) | set(RESUMABLE_SETTINGS) == names
    assert not set(RUN_DEFINING_SETTINGS) & set(RESUMABLE_SETTINGS)


CHANGES = [
    (["--resolution", "32"], "--resolution 32 (saved: 16)"),
    (["--seed", "1"], "--seed 1 (saved: 0)"),
    (["--model_preset", "base"], "--model_preset base (saved: small)"),
    (["--prediction_type", "v_prediction"], "--prediction_type v_prediction (saved: epsilon)"),
    (["--train_batch_size", "4"], "--train_batch_size 4 (saved: 8)"),
    (["--learning_rate", "1e-5"], "--learning_rate 1e-05 (saved: 0.0002)"),
    (["--use_ema", "false"], "--use_ema False (saved: True)"),
    (["--train_data_dir", str(RGB_FACES)], f"--train_data_dir {RGB_FACES} (saved: {FACES})"),
]


@pytest.mark.parametrize("flags,difference", CHANGES)
def test_a_resume_that_changes_the_run_is_refused(run, flags, difference):
    before = folder_state(run)
    with pytest.raises(ValueError) as refused:
        resume(run, *flags)
    assert str(refused.value) == (
        f"--resume_from_checkpoint latest: {run / 'training_args.json'} is from a different run ({difference}): "
        "resume with the saved settings, or start a new run in another --output_dir (or with --overwrite_output_dir "
        "and without --resume_from_checkpoint)."
    )
    assert folder_state(run) == before


def test_a_checkpoint_alone_is_enough_to_refuse(run):
    # A run stopped before its end has no training_args.json: its checkpoints carry its settings.
    (run / "training_args.json").unlink()
    before = folder_state(run)
    with pytest.raises(
        ValueError,
        match=r"checkpoint-2 is from a different run \(--center_crop True \(saved: False\), --seed 7 \(saved: 0\)\)",
    ):
        resume(run, "--seed", "7", "--center_crop")
    assert folder_state(run) == before


def test_a_finished_run_without_checkpoints_is_refused_too(run):
    shutil.rmtree(run / "checkpoint-2")
    before = folder_state(run)
    with pytest.raises(ValueError, match=r"training_args.json is from a different run \(--random_flip True"):
        resume(run, "--random_flip")
    assert folder_state(run) == before


def test_an_unreadable_training_args_json_is_refused(run):
    (run / "training_args.json").write_text('{"seed": 0')
    before = folder_state(run)
    with pytest.raises(ValueError, match=r"training_args.json is not valid JSON .*: restore it, or delete it"):
        resume(run)
    assert folder_state(run) == before


def test_the_same_data_spelt_another_way_is_the_same_run(run, monkeypatch):
    monkeypatch.chdir(FACES.parent)  # saved as an absolute path, given now as a relative one with a trailing slash
    assert resume(run, "--train_data_dir", f"./{FACES.name}/", "--max_train_steps", "3").global_step == 3


def test_a_run_saved_before_snr_gamma_0_resumes_with_the_unweighted_loss(run):
    # Earlier versions saved null for the document's unweighted loss, which is 0 now.
    state = run / "checkpoint-2" / "facediff_state.json"
    for path, key in ((run / "training_args.json", None), (state, "training_args")):
        saved = json.loads(path.read_text())
        (saved[key] if key else saved)["snr_gamma"] = None
        path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"--snr_gamma 5.0 \(saved: 0.0\)"):
        resume(run, "--snr_gamma", "5")
    assert resume(run).global_step == 4


def test_settings_free_to_change_on_resume_are_accepted(run):
    saved = json.loads((run / "checkpoint-2" / "facediff_state.json").read_text())
    assert saved["global_step"] == 2 and saved["training_args"]["train_data_dir"] == str(FACES)
    result = resume(
        run, "--max_train_steps", "5", "--checkpointing_steps", "3", "--checkpoints_total_limit", "1",
        "--eval_batch_size", "2", "--num_inference_steps", "2", "--logging_dir", "other-logs", "--cpu_threads", "1",
        "--mixed_precision", "no", "--max_grad_norm", "0.5",
    )  # fmt: skip
    assert result.global_step == 5
    assert json.loads((run / "training_args.json").read_text())["max_train_steps"] == 5


def test_a_resume_past_the_last_step_is_refused(run):
    before = folder_state(run)
    with pytest.raises(ValueError, match=r"checkpoint-2 is at step 2, past the 1 step\(s\) this run trains for: raise"):
        resume(run, "--max_train_steps", "1")
    assert folder_state(run) == before


def test_a_resume_at_the_last_step_saves_without_training(tmp_path, monkeypatch):
    # 24 images make 3 steps an epoch: checkpoint-2 is inside the first one.
    flags = tiny_run(tmp_path / "run", *DATA, "--max_train_samples", "24", "--max_train_steps", "3")
    train(parse_training_arguments(flags))
    AcceleratorState._reset_state(reset_partial_state=True)
    trained = record_batches(monkeypatch)
    resumed = [*flags, "--max_train_steps", "2", "--resume_from_checkpoint", "checkpoint-2"]
    result = train(parse_training_arguments(resumed))
    assert result.global_step == 2 and trained == []


def test_a_checkpoint_name_is_found_in_the_output_dir(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not where the run is
    flags = tiny_run(run, *DATA, "--resume_from_checkpoint", "checkpoint-2")
    assert train(parse_training_arguments(flags)).global_step == 4


def test_defaults_spelt_out_or_left_out_are_the_same_run(tmp_path):
    # The built-in digits: trained at 16 pixels and 1 channel without saying so.
    output = tmp_path / "digits"
    flags = ["--output_dir", str(output), "--model_config_name_or_path", str(TINY_GRAY_UNET),
             "--max_train_samples", "16", "--train_batch_size", "8",
             "--checkpointing_steps", "1", "--save_images_steps", "100", "--eval_batch_size", "1",
             "--num_inference_steps", "1", "--lr_warmup_steps", "1"]  # fmt: skip
    spelt_out = ["--resolution", "16", "--num_channels", "1"]
    latest = ["--resume_from_checkpoint", "latest"]
    train(parse_training_arguments([*flags, "--max_train_steps", "2"]))
    AcceleratorState._reset_state(reset_partial_state=True)
    assert train(parse_training_arguments([*flags, *spelt_out, "--max_train_steps", "3", *latest])).global_step == 3
    AcceleratorState._reset_state(reset_partial_state=True)
    assert train(parse_training_arguments([*flags, "--max_train_steps", "4", *latest])).global_step == 4
    AcceleratorState._reset_state(reset_partial_state=True)

    # Runs saved before the values in effect were kept left the defaults as None.
    for saved in (output / "training_args.json", output / "checkpoint-3" / "facediff_state.json"):
        content = json.loads(saved.read_text())
        (content.get("training_args") or content).update(resolution=None, num_channels=None)
        saved.write_text(json.dumps(content))
    assert train(parse_training_arguments([*flags, "--resolution", "16", "--max_train_steps", "5", *latest]))


class EMAOffTheCPU(EMAModel):
    """Stands in for an EMA moved to a GPU: `to` also makes it float64, which the CPU tensors that load_state
    gives are not."""

    made = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.made.append(self)

    def to(self, device=None, dtype=None, non_blocking=False):
        super().to(device=device, dtype=torch.float64, non_blocking=non_blocking)


def test_a_resumed_ema_stays_on_the_model_device(run, monkeypatch):
    monkeypatch.setattr(training, "EMAModel", EMAOffTheCPU)
    monkeypatch.setattr(EMAOffTheCPU, "made", [])
    trained = record_batches(monkeypatch)
    assert resume(run, "--max_train_steps", "2").global_step == 2 and trained == []  # the EMA as resumed
    (ema,) = EMAOffTheCPU.made
    assert all(param.dtype == torch.float64 for param in ema.shadow_params)
