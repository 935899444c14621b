"""A run that watches itself: evaluations during training (--eval_steps), the best weights (--save_best), and what
they leave in the output folder, the logs and the model card, across a stop and a resume."""

import json
import logging

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import UNet2DModel
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import HfArgumentParser

from facediff.checkpointing import STATE_FILE
from facediff.evaluation import SampleEvaluator
from facediff.model_card import training_evaluation_facts
from facediff.training import train
from facediff.training_args import TrainingArguments, parse_training_arguments
from facediff.training_evaluation import (
    BEST_EVAL_NAME,
    SCORES,
    TrainingEvaluator,
    read_best_eval,
    read_eval_log,
    rewind_evaluations,
    write_best_eval,
    write_eval_log,
)

from .conftest import FACES, folder_state, make_faces, tiny_run, tiny_unet
from .test_training import train_until_the_first_checkpoint

EVALUATED = ["--train_data_dir", str(FACES), "--max_train_samples", "16", "--eval_num_images", "8",
             "--eval_inference_steps", "3"]  # fmt: skip
PIPELINE_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
# A two-level UNet without attention, 16 and 32 channels (160k parameters): it learns 8 faces by heart within 240
# steps of x_0 prediction at a high learning rate, at about the cost per step of the tiny UNet.
MEMORISER_UNET = {
    "sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": (16, 32), "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 4, "add_attention": False,
}  # fmt: skip


def records_of(output) -> list[dict]:
    return [json.loads(line) for line in (output / "eval_log.jsonl").read_text().splitlines()]


def test_evaluations_are_logged_plotted_and_shown_on_the_card(tmp_path):
    output = tmp_path / "run"
    train(parse_training_arguments(tiny_run(output, *EVALUATED, "--max_train_steps", "5", "--eval_steps", "2")))

    records = records_of(output)
    assert [record["step"] for record in records] == [2, 4, 5]  # every 2 steps, and the last
    assert all(
        record.keys() == {"step", "train_minutes", "num_images", "inference_steps", *SCORES} for record in records
    )
    minutes = [record["train_minutes"] for record in records]
    assert 0 < minutes[0] <= minutes[1] <= minutes[2] < 1 and minutes[0] < minutes[2]
    assert all(record["num_images"] == 8 and record["inference_steps"] == 3 for record in records)
    logged = EventAccumulator(str(output / "logs" / "facediff")).Reload()  # the tracker's scalars, not its hparams
    tags = ("eval/pixel_pca_fd", "eval/pixel_pca_kid", "eval/pixel_pca_kid_std", "eval/memorised_share")
    for tag in (*tags, "eval/high_frequency_ratio"):
        assert [event.step for event in logged.Scalars(tag)] == [2, 4, 5], tag
    kids = [event.value for event in logged.Scalars("eval/pixel_pca_kid")]
    assert kids == pytest.approx([record["pixel_pca_kid_mean"] for record in records])

    assert Image.open(output / "eval_curve.png").format == "PNG"
    card = (output / "README.md").read_text()
    assert "## During training" in card and "![Evaluations during training](eval_curve.png)" in card
    assert "3 evaluations while training, each of 8 samples (seeds 0 to 7, 3 respaced steps, EMA weights)" in card
    assert "against the 16 training images" in card
    assert f"| 4 | {records[1]['train_minutes']:.1f} | {records[1]['pixel_pca_fd']:.3f} |" in card
    assert "{{" not in card and "None" not in card and "--save_best" not in card
    assert not (output / BEST_EVAL_NAME).exists()


def test_the_evaluation_notices_a_model_that_copies_its_training_faces(tmp_path, caplog):
    UNet2DModel(**MEMORISER_UNET).save_config(tmp_path / "memoriser")
    output = tmp_path / "run"
    flags = ["--train_data_dir", str(FACES), "--max_train_samples", "8", "--model_config_name_or_path",
             str(tmp_path / "memoriser"), "--ddpm_num_steps", "100", "--prediction_type", "sample",
             "--learning_rate", "3e-3", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
             "--ema_max_decay", "0.9", "--max_train_steps", "240", "--checkpointing_steps", "1000",
             "--save_images_steps", "1000", "--eval_steps", "60", "--eval_num_images", "16",
             "--eval_inference_steps", "10", "--save_best"]  # fmt: skip
    caplog.set_level(logging.WARNING, logger="facediff.training_evaluation")
    train(parse_training_arguments(tiny_run(output, *flags)))

    shares = {record["step"]: record["memorised_share"] for record in records_of(output)}
    assert list(shares) == [60, 120, 180, 240]
    assert shares[60] == 0 and shares[240] >= 0.5  # measured: 0, 0, 37.5% and 81.2% of the 16 samples
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any(message.startswith("At step 240, ") and "copies of training images" in message for message in warnings)
    assert all("real people's faces" in message and "--save_best" in message for message in warnings)
    assert not any(message.startswith("At step 60, ") for message in warnings)

    # --save_best kept an evaluation that does not copy, although the copies score the lowest KID.
    best = read_best_eval(output)
    assert shares[best["step"]] <= 0.05
    saved, kept = load_file(output / PIPELINE_WEIGHTS), load_file(output / BEST_EVAL_NAME)
    assert saved.keys() == kept.keys() and all(torch.equal(saved[name], kept[name]) for name in saved)
    assert f"of step {best['step']}, the best evaluation during training" in (output / "README.md").read_text()


def scores_in_turn(monkeypatch, turns: list[tuple[float, float]]) -> None:
    """Make each evaluation score the next (pixel-PCA KID, memorised share) of `turns`."""
    remaining = list(turns)

    def score(self, samples):
        kid, memorised = remaining.pop(0)
        return {"pixel_pca_fd": 10 * kid, "pixel_pca_kid_mean": kid, "pixel_pca_kid_std": 0.1,
                "memorised_share": memorised, "high_frequency_ratio": 1.0}  # fmt: skip

    monkeypatch.setattr(SampleEvaluator, "score", score)


def test_save_best_saves_the_best_evaluation_that_does_not_copy(tmp_path, monkeypatch, caplog):
    # Step 4 scores best; step 6 lower still, but with half of its samples copies.
    scores_in_turn(monkeypatch, [(3.0, 0.0), (1.0, 0.0), (0.5, 0.5)])
    caplog.set_level(logging.INFO, logger="facediff.training")
    output = tmp_path / "run"
    flags = [*EVALUATED, "--max_train_steps", "6", "--eval_steps", "2", "--use_ema", "false", "--save_best"]
    result = train(parse_training_arguments(tiny_run(output, *flags)))

    assert read_best_eval(output) == {"step": 4, "pixel_pca_kid_mean": 1.0}
    saved, best = load_file(output / PIPELINE_WEIGHTS), load_file(output / BEST_EVAL_NAME)
    assert saved.keys() == best.keys() and all(torch.equal(saved[name], best[name]) for name in saved)
    last = result.unet.state_dict()
    assert not all(torch.equal(saved[name], last[name]) for name in saved)
    # Each checkpoint keeps the best weights of its step, for a resume from it.
    assert read_best_eval(output / "checkpoint-2") == {"step": 2, "pixel_pca_kid_mean": 3.0}
    assert read_best_eval(output / "checkpoint-4") == {"step": 4, "pixel_pca_kid_mean": 1.0}
    card = (output / "README.md").read_text()
    assert "the trained weights (no EMA) of step 4, the best evaluation during training (`--save_best`)" in card
    assert "| **4** (saved) |" in card and "The saved weights are those of step 4" in card
    assert "At step 6, 50% of the evaluation's samples are copies" in caplog.text
    assert "Saved the pipeline (the weights of step 4's evaluation, the best: --save_best; the last step's are in " in (
        caplog.text
    )
    assert f"`facediff export {output / 'checkpoint-6'} OUT` makes a pipeline of them)" in caplog.text


def test_overwrite_output_dir_removes_the_old_runs_evaluations(tmp_path, monkeypatch):
    output = tmp_path / "run"
    flags = [*EVALUATED, "--max_train_steps", "3", "--eval_steps", "2", "--save_best"]
    train(parse_training_arguments(tiny_run(output, *flags)))
    AcceleratorState._reset_state(reset_partial_state=True)
    assert {"eval_log.jsonl", "eval_curve.png", BEST_EVAL_NAME} <= {path.name for path in output.iterdir()}

    train_until_the_first_checkpoint(monkeypatch, tiny_run(output, *EVALUATED, "--overwrite_output_dir"))
    assert sorted(path.name for path in output.iterdir()) == ["checkpoint-2", "logs"]


def test_the_card_table_shows_twenty_evaluations_and_the_settings_a_resume_changed():
    args = parse_training_arguments(["--output_dir", "unused", "--eval_steps", "10", "--save_best"])
    evaluations = [
        {"step": 10 * (index + 1), "num_images": 64 if index < 30 else 32, "inference_steps": 25,
         "pixel_pca_fd": 1.0, "pixel_pca_kid_mean": 0.5, "pixel_pca_kid_std": 0.1, "memorised_share": 0.0}
        for index in range(40)
    ]  # fmt: skip
    facts = training_evaluation_facts(args, evaluations, 3000, "eval_curve.png", best_step=150)
    rows = [line for line in facts["training_evaluation_table"].splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 20 and rows[0].startswith("| 10 | 64 | 25 |") and rows[-1].startswith("| 400 | 32 | 25 |")
    assert "| **150** (saved) |" in facts["training_evaluation_table"]
    assert "20 of the 40 evaluations; the curve above shows them all." in facts["training_evaluation_table"]
    setup = facts["training_evaluation_setup"]
    assert "how many, and in how many steps, below" in setup and "2000 of the 3000 training images" in setup


class Interrupted(Exception):
    pass


def test_a_stopped_and_resumed_run_evaluates_as_a_straight_one(tmp_path, monkeypatch):
    flags = [*EVALUATED, "--max_train_steps", "6", "--eval_steps", "1", "--random_flip", "--save_best"]
    train(parse_training_arguments(tiny_run(tmp_path / "straight", *flags)))
    AcceleratorState._reset_state(reset_partial_state=True)

    # Stopped as a kill would stop it after evaluating step 3, past its checkpoint-2: step 3 is trained again.
    evaluate = TrainingEvaluator.evaluate

    def stop_after_step_3(self, unet, scheduler, ema, step, train_seconds):
        record = evaluate(self, unet, scheduler, ema, step, train_seconds)
        if step == 3:
            raise Interrupted
        return record

    monkeypatch.setattr(TrainingEvaluator, "evaluate", stop_after_step_3)
    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        train(parse_training_arguments(tiny_run(resumed, *flags)))
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(TrainingEvaluator, "evaluate", evaluate)
    assert [record["step"] for record in records_of(resumed)] == [1, 2, 3]
    train(parse_training_arguments(tiny_run(resumed, *flags, "--resume_from_checkpoint", "latest")))

    # The same evaluations, but for the clock: a resume counts on from the minutes its checkpoint recorded.
    resumed_records, straight_records = records_of(resumed), records_of(tmp_path / "straight")
    minutes = [record.pop("train_minutes") for record in resumed_records]
    assert minutes == sorted(minutes) and minutes[0] > 0
    assert resumed_records == [{k: v for k, v in record.items() if k != "train_minutes"} for record in straight_records]
    assert [record["step"] for record in resumed_records] == [1, 2, 3, 4, 5, 6]
    # safetensors writes its metadata in no fixed order: compare what the files hold, not their bytes.
    assert read_best_eval(resumed) == read_best_eval(tmp_path / "straight")
    best, straight_best = load_file(resumed / BEST_EVAL_NAME), load_file(tmp_path / "straight" / BEST_EVAL_NAME)
    assert best.keys() == straight_best.keys() and all(torch.equal(best[name], straight_best[name]) for name in best)
    assert (resumed / PIPELINE_WEIGHTS).read_bytes() == (tmp_path / "straight" / PIPELINE_WEIGHTS).read_bytes()


def test_a_resume_rewinds_the_log_and_the_best_weights_to_its_checkpoint(tmp_path):
    output, checkpoint = tmp_path / "run", tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(json.dumps({"global_step": 2}))
    records = [{"step": step, "memorised_share": 0.0, "pixel_pca_kid_mean": 4.0 - step} for step in (1, 2, 3)]
    write_eval_log(output, records)
    write_best_eval(checkpoint, tiny_unet(1), records[1])
    write_best_eval(output, tiny_unet(1), records[2])  # from step 3, which the resume trains again

    rewind_evaluations(output, checkpoint)
    assert read_eval_log(output) == records[:2]
    assert read_best_eval(output) == {"step": 2, "pixel_pca_kid_mean": 2.0}
    (checkpoint / BEST_EVAL_NAME).unlink()  # a checkpoint from before the first best evaluation
    rewind_evaluations(output, checkpoint)
    assert not (output / BEST_EVAL_NAME).exists()
    rewind_evaluations(output, None)  # a run from step 0 keeps nothing of an earlier one
    assert not (output / "eval_log.jsonl").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--save_best"], "--save_best keeps the best evaluation's weights, but nothing is evaluated without "
                          "--eval_steps: pass --eval_steps N, or drop --save_best."),
        (["--eval_steps", "2", "--eval_num_images", "1"], "--eval_num_images must be at least 2, got 1."),
        (["--eval_steps", "0"], "--eval_steps must be at least 1, got 0."),
        (["--eval_steps", "2", "--eval_inference_steps", "20", "--ddpm_num_steps", "10"],
         "--eval_inference_steps (20) cannot exceed --ddpm_num_steps (10)."),
    ],
)  # fmt: skip
def test_bad_evaluation_settings_are_refused_in_one_line_before_anything_is_written(tmp_path, flags, message):
    output = tmp_path / "run"
    with pytest.raises(ValueError) as refused:
        parse_training_arguments(tiny_run(output, "--train_data_dir", str(FACES), "--num_inference_steps", "3", *flags))
    assert str(refused.value) == message
    assert not output.exists()


def test_the_help_lists_the_evaluation_flags():
    # argparse formats each help text with %, so a bare % in one (as in "5%") breaks --help.
    text = HfArgumentParser(TrainingArguments).format_help()
    assert all(flag in text for flag in ("--eval_steps", "--eval_num_images", "--eval_inference_steps", "--save_best"))


def test_evaluating_needs_two_training_images(tmp_path):
    one_face = make_faces(tmp_path / "one", 1, 16, "L", ".png")
    output = tmp_path / "run"
    before = folder_state(tmp_path)
    with pytest.raises(ValueError) as refused:
        train(parse_training_arguments(tiny_run(output, "--train_data_dir", str(one_face), "--train_batch_size", "1",
                                                "--eval_steps", "2")))  # fmt: skip
    assert str(refused.value) == (
        "--eval_steps compares samples with the training images and needs at least 2 of them, got 1: add images, or "
        "drop --eval_steps."
    )
    assert folder_state(tmp_path) == before
