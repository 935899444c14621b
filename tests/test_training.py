"""Training end to end on real faces, exact resume, checkpoints, and what the output folder holds."""

import json
import logging
import shutil
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

import facediff.training as training
from facediff import FaceDiffPipeline
from facediff.checkpointing import STATE_FILE, list_checkpoints, resolve_checkpoint
from facediff.training import NonFiniteLossError, train
from facediff.training_args import parse_training_arguments

from .conftest import (
    FACES,
    REPO,
    RGB_FACES,
    TINY_RGB_UNET,
    UNPATCHED_LOSS,
    folder_state,
    inf_gradients_for,
    record_batches,
    tiny_run,
    tiny_unet,
)


def test_trains_on_gray_faces_end_to_end(tmp_path):
    output = tmp_path / "faces"
    result = train(parse_training_arguments(tiny_run(output, "--train_data_dir", str(FACES), "--random_flip")))
    assert result.global_step == 4 and np.isfinite(result.final_loss)

    pipeline = FaceDiffPipeline.from_pretrained(output)
    assert pipeline.unet.config.in_channels == 1 and pipeline.unet.config.sample_size == 16
    image = pipeline(num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.mode == "L" and image.size == (16, 16)

    assert [path.name for path in list_checkpoints(output)] == ["checkpoint-2", "checkpoint-4"]  # the last step too
    assert Image.open(output / "sample_grid.png").size == (32, 32)  # 4 images of 16x16 as 2x2
    assert (output / "samples" / "step-000002.png").exists()
    assert list((output / "logs").rglob("events.out.tfevents.*"))
    assert json.loads((output / "training_args.json").read_text())["train_data_dir"] == str(FACES)
    card = (output / "README.md").read_text()
    assert "library_name: diffusers" in card and "pipeline_tag: unconditional-image-generation" in card
    assert "the image folder `train`, 40 images" in card and "4 steps of AdamW" in card and "wall time" in card
    assert "{{" not in card and "None" not in card
    assert "## During training" not in card and not (output / "eval_log.jsonl").exists()  # without --eval_steps


def test_trains_on_rgb_jpeg_faces(tmp_path):
    output = tmp_path / "rgb"
    flags = ["--train_data_dir", str(RGB_FACES), "--max_train_samples", "20", "--prediction_type", "v_prediction",
             "--model_config_name_or_path", str(TINY_RGB_UNET)]  # fmt: skip
    train(parse_training_arguments(tiny_run(output, *flags, "--snr_gamma", "5", "--use_ema", "false")))
    pipeline = FaceDiffPipeline.from_pretrained(output)
    assert pipeline.unet.config.in_channels == 3 and pipeline.scheduler.config.prediction_type == "v_prediction"
    assert pipeline(num_inference_steps=2).images[0].mode == "RGB"
    assert "20 images" in (output / "README.md").read_text()


def test_trains_on_the_builtin_digits_by_default(tmp_path):
    args = parse_training_arguments(tiny_run(tmp_path / "digits", "--max_train_steps", "2"))
    assert args.uses_builtin_digits
    train(args)
    assert "handwritten digits" in (tmp_path / "digits" / "README.md").read_text()


def test_the_builtin_digits_default_to_the_main_job_recipe_and_flags_win():
    def defaults(args):
        return args.model_preset, args.train_batch_size, args.learning_rate, args.snr_gamma

    digits = parse_training_arguments([])
    assert defaults(digits) == ("tiny", 32, 1e-3, 5.0)
    assert digits.total_train_steps(steps_per_epoch=57) == 3900
    assert defaults(parse_training_arguments(["--train_data_dir", str(FACES)])) == ("small", 64, 2e-4, 0.0)
    spelt_out = parse_training_arguments(["--model_preset", "small", "--learning_rate", "3e-4", "--snr_gamma", "0"])
    assert defaults(spelt_out) == ("small", 32, 3e-4, 0.0)
    assert replace(digits).snr_gamma == 5.0 and replace(spelt_out).snr_gamma == 0.0  # resolved once, kept as saved


def test_snr_gamma_0_is_the_unweighted_loss_of_diffusers_ddpm():
    """`--snr_gamma 0` trains the document's plain noise-prediction MSE, recomputed here with diffusers' scheduler."""
    from diffusers import DDPMScheduler

    from facediff import FaceDiffScheduler
    from facediff.training import _diffusion_loss

    unet = tiny_unet(1)
    pixels = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8)
    torch.manual_seed(0)
    loss = _diffusion_loss(unet, FaceDiffScheduler(), pixels, parse_training_arguments(["--snr_gamma", "0"]))
    torch.manual_seed(0)
    clean = pixels.float() / 127.5 - 1
    noise = torch.randn_like(clean)
    timesteps = torch.randint(0, 1000, (64,))
    noisy = DDPMScheduler(num_train_timesteps=1000).add_noise(clean, noise, timesteps)
    expected = torch.nn.functional.mse_loss(unet(noisy, timesteps).sample, noise)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    weighted = _diffusion_loss(unet, FaceDiffScheduler(), pixels, parse_training_arguments([]))
    assert weighted < loss  # the digits' default, min-SNR 5, weighs the low-noise steps down


def test_a_negative_snr_gamma_is_refused():
    with pytest.raises(ValueError, match=r"--snr_gamma must be positive, or 0 for the unweighted loss; got -1.0"):
        parse_training_arguments(["--snr_gamma", "-1"])


class Interrupted(Exception):
    pass


def train_until_the_first_checkpoint(monkeypatch, flags: list[str]) -> None:
    """Train, and stop as a killed run would, right after the first checkpoint is saved."""
    save_checkpoint = training.checkpointing.save_checkpoint

    def stop_after_first(*args, **kwargs):
        save_checkpoint(*args, **kwargs)
        raise Interrupted

    monkeypatch.setattr(training.checkpointing, "save_checkpoint", stop_after_first)
    with pytest.raises(Interrupted):
        train(parse_training_arguments(flags))
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(training.checkpointing, "save_checkpoint", save_checkpoint)


def test_clip_sample_is_saved_with_the_pipeline_and_named_in_its_card(tmp_path):
    train(parse_training_arguments(tiny_run(tmp_path / "run", "--train_data_dir", str(FACES), "--clip_sample")))
    config = FaceDiffPipeline.from_pretrained(tmp_path / "run").scheduler.config
    assert (config.clip_sample, config.variance_type) == (True, "fixed_large")
    card = (tmp_path / "run" / "README.md").read_text()
    assert "noise scale sqrt(beta_t), x_0 clipped to [-1, 1]" in card
    assert parse_training_arguments([]).clip_sample is None  # unclipped unless asked: the document's update


def test_resume_is_exact(tmp_path, monkeypatch):
    flags = ["--train_data_dir", str(FACES), "--max_train_samples", "40", "--max_train_steps", "8",
             "--random_flip", "--gradient_accumulation_steps", "2"]  # fmt: skip
    straight_batches = record_batches(monkeypatch)
    train(parse_training_arguments(tiny_run(tmp_path / "straight", *flags)))
    AcceleratorState._reset_state(reset_partial_state=True)

    resumed_batches = record_batches(monkeypatch)
    train_until_the_first_checkpoint(monkeypatch, tiny_run(tmp_path / "resumed", *flags))
    train(parse_training_arguments(tiny_run(tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")))

    # 5 batches an epoch make 3 steps (2 + 2 + 1 batches): 8 steps are 14 batches, the same in both runs.
    assert len(straight_batches) == 14 and resumed_batches == straight_batches
    for name in ("model.safetensors",):
        a, b = load_file(tmp_path / "straight/checkpoint-6" / name), load_file(tmp_path / "resumed/checkpoint-6" / name)
        assert all(torch.equal(a[key], b[key]) for key in a)
    for name in ("optimizer.bin", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl"):
        a = torch.load(tmp_path / "straight/checkpoint-6" / name, weights_only=False)
        b = torch.load(tmp_path / "resumed/checkpoint-6" / name, weights_only=False)
        assert _nested_equal(a, b), name
    final_a = load_file(tmp_path / "straight/unet/diffusion_pytorch_model.safetensors")
    final_b = load_file(tmp_path / "resumed/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final_a[key], final_b[key]) for key in final_a)


def test_a_finished_run_extends_exactly(tmp_path):
    # 24 images make 3 steps an epoch; a constant rate, so the first 3 steps do not depend on the length.
    flags = ["--train_data_dir", str(FACES), "--max_train_samples", "24", "--random_flip", "--lr_scheduler", "constant",
             "--checkpointing_steps", "100", "--max_train_steps", "3"]  # fmt: skip
    train(parse_training_arguments(tiny_run(tmp_path / "extended", *flags)))
    assert [path.name for path in list_checkpoints(tmp_path / "extended")] == ["checkpoint-3"]
    AcceleratorState._reset_state(reset_partial_state=True)
    more = [*flags[:-2], "--max_train_steps", "6"]
    extend = [*more, "--resume_from_checkpoint", "latest"]
    assert train(parse_training_arguments(tiny_run(tmp_path / "extended", *extend))).global_step == 6
    AcceleratorState._reset_state(reset_partial_state=True)
    train(parse_training_arguments(tiny_run(tmp_path / "straight", *more)))

    for name in ("unet/diffusion_pytorch_model.safetensors", "checkpoint-6/model.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "extended" / name)
        assert all(torch.equal(a[key], b[key]) for key in a), name


def _nested_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_nested_equal(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_nested_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_checkpoints_rotate_and_partial_ones_are_never_latest(tmp_path):
    output = tmp_path / "run"
    flags = ["--train_data_dir", str(FACES), "--max_train_samples", "16", "--max_train_steps", "7",
             "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--save_images_steps", "100"]  # fmt: skip
    train(parse_training_arguments(tiny_run(output, *flags)))
    assert [path.name for path in list_checkpoints(output)] == ["checkpoint-6", "checkpoint-7"]
    # What a kill during a save leaves behind: a staging folder, and a checkpoint-N folder without its state file.
    shutil.copytree(output / "checkpoint-7", output / ".checkpoint-9.partial")
    (output / "checkpoint-12").mkdir()
    assert resolve_checkpoint("latest", output) == output / "checkpoint-7"


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    original = training._diffusion_loss
    calls = []

    def exploding(unet, scheduler, pixels, args):
        calls.append(1)
        loss = original(unet, scheduler, pixels, args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(training, "_diffusion_loss", exploding)
    output = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"at step 3.*checkpoint-2, is kept"):
        train(parse_training_arguments(tiny_run(output, "--train_data_dir", str(FACES), "--max_train_samples", "16")))
    weights = load_file(output / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert not (output / "model_index.json").exists()


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_non_finite_gradients_stop_with_the_step_and_keep_the_checkpoint(tmp_path, monkeypatch, precision):
    calls = []

    def poisoned_gradients(unet, scheduler, pixels, args):
        calls.append(1)
        loss = UNPATCHED_LOSS(unet, scheduler, pixels, args)
        if len(calls) == 3:  # a finite loss whose backward pass yields NaN gradients
            unet.conv_in.weight.register_hook(lambda grad: grad * float("nan"))
        return loss

    monkeypatch.setattr(training, "_diffusion_loss", poisoned_gradients)
    output = tmp_path / "run"
    flags = ["--train_data_dir", str(FACES), "--max_train_samples", "16", "--max_grad_norm", "0"]
    flags += ["--mixed_precision", precision]  # fp16 on a CPU has no gradient scaler to skip the step
    with pytest.raises(NonFiniteLossError, match=r"gradient norm became nan at step 3.*checkpoint-2, is kept"):
        train(parse_training_arguments(tiny_run(output, *flags)))
    weights = load_file(output / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_refuses_an_output_dir_holding_another_run(tmp_path):
    output = tmp_path / "run"
    flags = ["--train_data_dir", str(FACES), "--max_train_samples", "16", "--max_train_steps", "2"]
    train(parse_training_arguments(tiny_run(output, *flags)))
    before = folder_state(output)
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match="already holds a training run.*--overwrite_output_dir"):
        train(parse_training_arguments(tiny_run(output, *flags)))
    assert folder_state(output) == before
    train(parse_training_arguments(tiny_run(output, *flags, "--overwrite_output_dir")))


def test_same_seed_and_flags_give_identical_weights_and_samples(tmp_path):
    flags = ["--train_data_dir", str(FACES), "--max_train_samples", "16", "--max_train_steps", "2",
             "--save_images_steps", "1", "--random_flip"]  # fmt: skip
    for name in ("first", "second"):
        train(parse_training_arguments(tiny_run(tmp_path / name, *flags)))
        AcceleratorState._reset_state(reset_partial_state=True)
    first = load_file(tmp_path / "first/unet/diffusion_pytorch_model.safetensors")
    second = load_file(tmp_path / "second/unet/diffusion_pytorch_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    for grid in ("sample_grid.png", "samples/step-000001.png"):
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "first" / grid)), np.asarray(Image.open(tmp_path / "second" / grid))
        )


def test_config_files_give_the_same_arguments_as_flags(tmp_path):
    # YAML reads 1e-3 as a string; it must still become the float the flag gives.
    (tmp_path / "run.yaml").write_text("output_dir: out\nlearning_rate: 1e-3\nuse_ema: false\nrandom_flip: true\n")
    (tmp_path / "run.json").write_text(json.dumps({"output_dir": "out", "learning_rate": 1e-3, "use_ema": False,
                                                   "random_flip": True}))  # fmt: skip
    from_flags = parse_training_arguments(["--output_dir", "out", "--learning_rate", "1e-3", "--use_ema", "false",
                                           "--random_flip"])  # fmt: skip
    assert parse_training_arguments([str(tmp_path / "run.yaml")]) == from_flags
    assert parse_training_arguments([str(tmp_path / "run.json")]) == from_flags
    assert from_flags.use_ema is False and from_flags.learning_rate == 1e-3


def with_gradient_scaler(make_accelerator):
    """What Accelerate sets up for fp16 on CUDA, on this CPU: a gradient scaler that skips overflowing steps."""

    def make(args, output_dir):
        accelerator = make_accelerator(args, output_dir)
        accelerator.scaler = torch.amp.GradScaler("cpu")
        return accelerator

    return make


def test_gradient_scaler_recovers_from_a_few_overflowing_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "_make_accelerator", with_gradient_scaler(training._make_accelerator))
    monkeypatch.setattr(training, "_build_model", inf_gradients_for(3))
    output = tmp_path / "run"
    flags = ["--train_data_dir", str(FACES), "--max_train_samples", "16", "--max_train_steps", "6"]
    result = train(parse_training_arguments(tiny_run(output, *flags)))
    assert result.global_step == 6
    assert all(torch.isfinite(parameter).all() for parameter in result.unet.parameters())


def test_persistent_gradient_scaler_skips_stop_training(tmp_path, monkeypatch):
    skips = training.MAX_CONSECUTIVE_SKIPPED_STEPS
    monkeypatch.setattr(training, "_make_accelerator", with_gradient_scaler(training._make_accelerator))
    monkeypatch.setattr(training, "_build_model", inf_gradients_for(10_000))
    output = tmp_path / "run"
    flags = ["--train_data_dir", str(FACES), "--max_train_samples", "16", "--max_train_steps", str(skips + 5),
             "--checkpointing_steps", "10", "--save_images_steps", "100"]  # fmt: skip
    message = rf"gradient norm \(non-finite at every fp16 loss scale for {skips} steps\) became inf"
    with pytest.raises(NonFiniteLossError, match=rf"{message} at step {skips}.*checkpoint-20, is kept"):
        train(parse_training_arguments(tiny_run(output, *flags)))
    # Every step was skipped, so the checkpoints hold the initial weights, unchanged and finite.
    first, last = (load_file(output / name / "model.safetensors") for name in ("checkpoint-10", "checkpoint-20"))
    assert all(torch.equal(first[name], last[name]) and torch.isfinite(last[name]).all() for name in first)
    assert not (output / "model_index.json").exists()


def test_overwrite_output_dir_replaces_the_old_run_only_once_the_new_one_is_set_up(tmp_path, monkeypatch):
    output = tmp_path / "run"
    flags = ["--train_data_dir", str(FACES), "--max_train_samples", "16", "--max_train_steps", "3",
             "--checkpointing_steps", "1", "--save_images_steps", "1"]  # fmt: skip
    train(parse_training_arguments(tiny_run(output, *flags, "--seed", "1")))
    AcceleratorState._reset_state(reset_partial_state=True)

    # A mistake in the new run's data is found before the old run is touched.
    old_logs = set((output / "logs").rglob("events.out.tfevents.*"))
    before = folder_state(output)
    typo = ["--train_data_dir", str(tmp_path / "missing"), "--overwrite_output_dir"]
    with pytest.raises(ValueError, match="does not exist"):
        train(parse_training_arguments(tiny_run(output, *flags, *typo)))
    assert folder_state(output) == before
    AcceleratorState._reset_state(reset_partial_state=True)

    # The new run stops after its first checkpoint: nothing of the old run is left to make its resume look foreign.
    train_until_the_first_checkpoint(monkeypatch, tiny_run(output, *flags, "--overwrite_output_dir"))
    assert sorted(path.name for path in output.iterdir()) == ["checkpoint-1", "logs"]
    assert old_logs and not old_logs & set((output / "logs").rglob("events.out.tfevents.*"))
    assert (
        train(parse_training_arguments(tiny_run(output, *flags, "--resume_from_checkpoint", "latest"))).global_step == 3
    )


def test_flags_after_a_config_file_override_and_extend_it(tmp_path):
    (tmp_path / "run.yaml").write_text("output_dir: out\nlearning_rate: 1e-3\nuse_ema: false\n")
    # What every stop message suggests: the same command plus --resume_from_checkpoint latest.
    resumed = parse_training_arguments([str(tmp_path / "run.yaml"), "--resume_from_checkpoint", "latest"])
    overridden = parse_training_arguments([str(tmp_path / "run.yaml"), "--learning_rate", "2e-3", "--use_ema"])
    assert resumed == parse_training_arguments(["--output_dir", "out", "--learning_rate", "1e-3", "--use_ema",
                                                "false", "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert overridden.learning_rate == 2e-3 and overridden.use_ema is True and overridden.output_dir == "out"


def test_yaml_no_is_the_mixed_precision_choice_no(tmp_path):
    # YAML 1.1 reads an unquoted `no` as false.
    (tmp_path / "run.yaml").write_text("output_dir: out\nmixed_precision: no\n")
    assert parse_training_arguments([str(tmp_path / "run.yaml")]).mixed_precision == "no"


def test_max_train_minutes_alone_ends_the_run_and_saves_it(tmp_path, caplog):
    flags = tiny_run(tmp_path / "run", "--train_data_dir", str(FACES), "--lr_scheduler", "constant_with_warmup",
                     "--max_train_minutes", "1e-6")  # fmt: skip
    args = replace(parse_training_arguments(flags), max_train_steps=None)  # bounded by the clock alone
    with caplog.at_level(logging.INFO, logger="facediff.training"):
        result = train(args)
    assert result.global_step == 1  # the first step already takes longer than 60 microseconds
    assert "Stopped at step 1: 0.0 minutes of training (--max_train_minutes)" in caplog.text
    assert (tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "run" / "sample_grid.png").is_file()


def test_max_train_minutes_counts_the_minutes_before_a_resume(tmp_path, monkeypatch):
    flags = tiny_run(tmp_path / "run", "--train_data_dir", str(FACES), "--max_train_steps", "6")
    train_until_the_first_checkpoint(monkeypatch, flags)
    state_file = tmp_path / "run" / "checkpoint-2" / STATE_FILE
    state = json.loads(state_file.read_text())
    assert 0 < state["train_seconds"] < 60
    state["train_seconds"] = 600.0  # as if the first two steps had taken ten minutes
    state_file.write_text(json.dumps(state))

    result = train(
        parse_training_arguments([*flags, "--resume_from_checkpoint", "latest", "--max_train_minutes", "10"])
    )
    assert result.global_step == 2  # the budget was spent before the resume: no step more
    assert (tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_max_train_minutes_alone_needs_a_schedule_without_a_length(tmp_path):
    with pytest.raises(ValueError) as refused:
        parse_training_arguments(["--output_dir", str(tmp_path / "run"), "--max_train_minutes", "5"])
    assert str(refused.value) == (
        "--lr_scheduler cosine decays over the run's steps, and --max_train_minutes alone sets none: pass "
        "--lr_scheduler constant_with_warmup or inverse_sqrt, or --max_train_steps as well."
    )
    for schedule in ("constant", "constant_with_warmup", "inverse_sqrt"):
        args = parse_training_arguments(
            ["--output_dir", str(tmp_path / "run"), "--max_train_minutes", "5", "--lr_scheduler", schedule]
        )
        assert args.lr_scheduler == schedule
    assert not (tmp_path / "run").exists()
    assert parse_training_arguments(["--max_train_minutes", "5", "--max_train_steps", "100"]).max_train_minutes == 5
    with pytest.raises(ValueError, match=r"^--max_train_minutes must be positive, got 0.0.$"):
        parse_training_arguments(["--max_train_minutes", "0", "--lr_scheduler", "constant"])


def test_inverse_sqrt_warms_up_then_falls_as_one_over_the_root_of_the_step(tmp_path):
    flags = ["--train_data_dir", str(FACES), "--learning_rate", "1e-3", "--lr_scheduler", "inverse_sqrt",
             "--lr_warmup_steps", "2", "--max_train_steps", "8", "--checkpointing_steps", "1"]  # fmt: skip
    train(parse_training_arguments(tiny_run(tmp_path / "run", *flags)))
    schedules = [tmp_path / "run" / f"checkpoint-{step}" / "custom_checkpoint_0.pkl" for step in range(1, 9)]
    rates = [torch.load(path, weights_only=False)["_last_lr"][0] for path in schedules]
    # the rate for the step after each checkpoint: linear to 1e-3 over 2 steps, then 1e-3 * sqrt(2 / step)
    assert rates == pytest.approx([1e-3 * min(step / 2, (2 / step) ** 0.5) for step in range(1, 9)], rel=1e-9)


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_every_recipe_file_parses(recipe):
    args = parse_training_arguments([str(recipe), "--train_data_dir", str(FACES)])
    assert args.max_train_minutes is not None and args.eval_steps is not None and args.save_best


def test_adamw_is_fused_and_updates_as_torchs_per_weight_loop(tmp_path):
    flags = ["--train_data_dir", str(FACES), "--max_train_steps", "1", "--checkpointing_steps", "1"]
    args = parse_training_arguments(tiny_run(tmp_path / "run", *flags))
    train(args)
    saved = torch.load(tmp_path / "run" / "checkpoint-1" / "optimizer.bin", weights_only=False)
    assert saved["param_groups"][0]["fused"] is True

    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(32)]
    gradients = [[torch.randn_like(weight) for weight in weights] for _ in range(3)]
    fused = [weight.clone().requires_grad_() for weight in weights]
    reference = [weight.clone().requires_grad_() for weight in weights]
    optimizers = (
        training.build_optimizer(args, fused, SimpleNamespace(device=torch.device("cpu"), scaler=None)),
        torch.optim.AdamW(reference, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                          weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, foreach=False),
    )  # fmt: skip
    for step_gradients in gradients:
        for optimizer, params in zip(optimizers, (fused, reference), strict=True):
            for param, gradient in zip(params, step_gradients, strict=True):
                param.grad = gradient.clone()
            optimizer.step()
    for mine, theirs, start in zip(fused, reference, weights, strict=True):
        assert not torch.equal(theirs, start)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-7)
