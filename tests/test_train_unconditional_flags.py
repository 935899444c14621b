"""A drop-in for diffusers' examples/unconditional_image_generation/train_unconditional.py: its test file's three
cases with their flags unchanged (local images and UNet config in place of the Hub's dummy ones), and the flags
facediff took on from it."""

import logging

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import UNet2DModel
from PIL import Image
from transformers import HfArgumentParser

import facediff.training as training
from facediff import FaceDiffPipeline
from facediff.data import to_pixels
from facediff.training import train
from facediff.training_args import TrainingArguments, parse_training_arguments

from .conftest import FACES, RGB_FACES, TEST_DATA, TINY_RGB_UNET, make_faces, tiny_run, tiny_unet_config

# hf-internal-testing/dummy_image_class_data and diffusers/ddpm_dummy, made here: 6 RGB images (6 steps an epoch at
# batch 1, as the example's test counts them) and a two-level UNet config.
DUMMY_IMAGES = make_faces(TEST_DATA / "dummy-image-class-data" / "train", 6, 72, "RGB", ".png")


@pytest.fixture(scope="module")
def dummy_unet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpm_dummy")
    UNet2DModel(**tiny_unet_config(3, resolution=32)).save_config(folder)
    return folder


def example_flags(tmpdir, dummy_unet, flags: str) -> list[str]:
    """The example's test flags, with the local stand-ins for its Hub dataset and model config."""
    return [
        "--train_data_dir", str(DUMMY_IMAGES), "--model_config_name_or_path", str(dummy_unet), "--resolution", "64",
        "--output_dir", str(tmpdir), *flags.split(),
    ]  # fmt: skip


def checkpoints(folder) -> set[str]:
    return {path.name for path in folder.iterdir() if "checkpoint" in path.name}


def test_train_unconditional(tmp_path, dummy_unet):
    flags = """--train_batch_size 2 --num_epochs 1 --gradient_accumulation_steps 1 --ddpm_num_inference_steps 2
        --learning_rate 1e-3 --lr_warmup_steps 5"""
    train(parse_training_arguments(example_flags(tmp_path, dummy_unet, flags)))
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file()


def test_unconditional_checkpointing_checkpoints_total_limit(tmp_path, dummy_unet):
    flags = """--train_batch_size 1 --num_epochs 1 --gradient_accumulation_steps 1 --ddpm_num_inference_steps 2
        --learning_rate 1e-3 --lr_warmup_steps 5 --checkpointing_steps=2 --checkpoints_total_limit=2"""
    train(parse_training_arguments(example_flags(tmp_path, dummy_unet, flags)))
    assert checkpoints(tmp_path) == {"checkpoint-4", "checkpoint-6"}


def test_unconditional_checkpointing_checkpoints_total_limit_removes_multiple_checkpoints(tmp_path, dummy_unet):
    common = """--train_batch_size 1 --gradient_accumulation_steps 1 --ddpm_num_inference_steps 1 --learning_rate 1e-3
        --lr_warmup_steps 5"""
    train(
        parse_training_arguments(
            example_flags(tmp_path, dummy_unet, f"{common} --num_epochs 1 --checkpointing_steps=2")
        )
    )
    assert checkpoints(tmp_path) == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}

    AcceleratorState._reset_state(reset_partial_state=True)
    resume = f"{common} --num_epochs 2 --resume_from_checkpoint=checkpoint-6 --checkpointing_steps=2"
    resume += " --checkpoints_total_limit=2"
    train(parse_training_arguments(example_flags(tmp_path, dummy_unet, resume)))
    assert checkpoints(tmp_path) == {"checkpoint-10", "checkpoint-12"}


def test_every_flag_of_the_example_is_accepted():
    flags = """--dataset_name some/faces --dataset_config_name default --model_config_name_or_path cfg --train_data_dir
        x --output_dir out --overwrite_output_dir --cache_dir cache --resolution 64 --center_crop --random_flip
        --train_batch_size 16 --eval_batch_size 16 --dataloader_num_workers 0 --num_epochs 100 --save_images_epochs 10
        --save_model_epochs 10 --gradient_accumulation_steps 1 --learning_rate 1e-4 --lr_scheduler cosine
        --lr_warmup_steps 500 --adam_beta1 0.95 --adam_beta2 0.999 --adam_weight_decay 1e-6 --adam_epsilon 1e-08
        --use_ema --ema_inv_gamma 1.0 --ema_power 0.75 --ema_max_decay 0.9999 --push_to_hub --hub_token t
        --hub_model_id id --hub_private_repo --logger tensorboard --logging_dir logs --local_rank -1
        --mixed_precision no --prediction_type epsilon --ddpm_num_steps 1000 --ddpm_num_inference_steps 1000
        --ddpm_beta_schedule linear --checkpointing_steps 500 --checkpoints_total_limit 3
        --resume_from_checkpoint latest --enable_xformers_memory_efficient_attention
        --preserve_input_precision""".split()
    assert len({flag for flag in flags if flag.startswith("--")}) == 45
    # Parsed without the checks that follow (this mix names two data sources and a token on purpose).
    parsed, unknown = HfArgumentParser(TrainingArguments).parse_known_args(flags)
    assert unknown == [] and parsed.num_inference_steps == 1000 and parsed.save_model_epochs == 10


def test_a_token_on_the_command_line_is_refused_without_repeating_it(tmp_path):
    with pytest.raises(ValueError, match="--hub_token is refused.*`hf auth login`.*HF_TOKEN") as error:
        parse_training_arguments(tiny_run(tmp_path, "--hub_token", "hf_secretvalue"))
    assert "hf_secretvalue" not in str(error.value)
    (tmp_path / "run.yaml").write_text("hub_token: hf_secretvalue\n")
    with pytest.raises(ValueError, match="--hub_token is refused"):
        parse_training_arguments([str(tmp_path / "run.yaml")])


def test_the_epoch_saves_of_the_example(tmp_path, caplog, monkeypatch):
    # 24 images of 8 make 3 steps an epoch; every 2nd epoch from the first: epochs 0 and 2 of 4 (the last one is the
    # run's own final save, left out here so that the folder holds what the epochs saved).
    monkeypatch.setattr(training, "_save_final", lambda *args: None)
    flags = ["--train_data_dir", str(FACES), "--max_train_samples", "24", "--num_epochs", "4", "--save_images_steps",
             "100", "--save_images_epochs", "2", "--save_model_epochs", "2"]  # fmt: skip
    run = tiny_run(tmp_path, *flags)
    at = run.index("--max_train_steps")
    del run[at : at + 2]  # the epochs bound the run
    with caplog.at_level(logging.INFO, logger="facediff.training"):
        train(parse_training_arguments(run))
    assert sorted(path.name for path in (tmp_path / "samples").iterdir()) == ["step-000003.png", "step-000009.png"]
    assert "Saved the pipeline of epoch 0 (step 3)" in caplog.text
    assert "Saved the pipeline of epoch 2 (step 9)" in caplog.text and "epoch 1 " not in caplog.text
    image = FaceDiffPipeline.from_pretrained(tmp_path)(num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 1)


def test_xformers_falls_back_to_pytorch_attention_with_one_line(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(training, "is_xformers_available", lambda: False)
    flags = ["--train_data_dir", str(FACES), "--max_train_steps", "1", "--enable_xformers_memory_efficient_attention"]
    with caplog.at_level(logging.INFO, logger="facediff.training"):
        train(parse_training_arguments(tiny_run(tmp_path, *flags)))
    assert "xformers is not installed, so attention runs through PyTorch's scaled_dot_product_attention" in caplog.text


def test_a_dataset_configuration_is_chosen_by_name(tmp_path):
    # A dataset repo (as cloned from the Hub) with two configurations, declared in its card as the Hub reads them.
    repo = tmp_path / "faces-repo"
    for name, source in (("gray", FACES), ("rgb", RGB_FACES)):
        (repo / name).mkdir(parents=True)
        for path in sorted(source.iterdir())[:10]:
            (repo / name / path.name).write_bytes(path.read_bytes())
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: gray\n  data_dir: gray\n- config_name: rgb\n  data_dir: rgb\n---\n"
    )
    flags = ["--dataset_name", str(repo), "--dataset_config_name", "rgb", "--max_train_steps", "1"]
    # RGB, as the channels found in the data show: the gray configuration would fail on the RGB UNet.
    train(
        parse_training_arguments(tiny_run(tmp_path / "out", *flags, "--model_config_name_or_path", str(TINY_RGB_UNET)))
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert "10 images" in card and FaceDiffPipeline.from_pretrained(tmp_path / "out").unet.config.in_channels == 3

    with pytest.raises(ValueError, match="--dataset_config_name rgb chooses a configuration of --dataset_name"):
        parse_training_arguments(
            tiny_run(tmp_path / "x", "--train_data_dir", str(FACES), "--dataset_config_name", "rgb")
        )


def sixteen_bit_faces(folder, count=8) -> list[np.ndarray]:
    """Gray 16-bit PNGs whose levels fall between those of 8 bits."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    levels = []
    for index in range(count):
        values = (rng.integers(0, 65536, (16, 16)) // 7).astype(np.uint16)
        Image.fromarray(values).save(folder / f"{index}.png")
        levels.append(values)
    return levels


def test_preserve_input_precision_keeps_16_bit_levels(tmp_path):
    sixteen_bit_faces(tmp_path / "deep")
    with Image.open(tmp_path / "deep" / "0.png") as image:
        precise, rounded = to_pixels(image, 1, 16, precise=True), to_pixels(image, 1, 16)
        expected = np.asarray(image, dtype=np.float64) / 65535 * 255
    assert precise.dtype == np.float32 and rounded.dtype == np.uint8
    assert np.allclose(precise[0], expected, atol=1e-3)  # the image is already 16x16: no resampling
    assert np.array_equal(rounded[0], np.round(expected).astype(np.uint8))
    assert np.abs(precise - np.round(precise)).max() > 0.1

    flags = ["--train_data_dir", str(tmp_path / "deep"), "--preserve_input_precision", "--eval_steps", "2"]
    result = train(parse_training_arguments(tiny_run(tmp_path / "out", *flags)))
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.final_loss))
