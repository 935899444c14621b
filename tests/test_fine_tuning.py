"""Fine-tuning (--pretrained_model_name_or_path): from a DDPMPipeline that diffusers saved, a facediff pipeline, or a
Hub repo in the cache; what is adapted to the data and what is refused."""

import re

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import DDPMPipeline, DDPMScheduler
from huggingface_hub import ModelCard

from facediff import FaceDiffPipeline
from facediff.training import train
from facediff.training_args import parse_training_arguments

from .conftest import FACES, RGB_FACES, folder_state, lay_out_as_hub_cache, tiny_run, tiny_unet

# AdamW moves each weight by about the learning rate per step, whatever the gradient: this leaves the base's weights
# equal to 1e-9, where a run from scratch would start from other random weights altogether.
NEGLIGIBLE_RATE = "1e-12"


def fine_tune(output_dir, base, *flags) -> list[str]:
    """`tiny_run`'s flags with the base in place of the tiny UNet config."""
    run = tiny_run(output_dir, "--pretrained_model_name_or_path", str(base), *flags)
    at = run.index("--model_config_name_or_path")
    return run[:at] + run[at + 2 :]


@pytest.fixture
def ddpm_base(tmp_path):
    """A DDPMPipeline as diffusers itself saves one (safetensors), with a schedule and sampler other than facediff's
    defaults, so that carrying them over shows."""
    torch.manual_seed(3)
    scheduler = DDPMScheduler(beta_end=0.012, variance_type="fixed_small", clip_sample=True)
    DDPMPipeline(unet=tiny_unet(1), scheduler=scheduler).save_pretrained(tmp_path / "ddpm-base")
    return tmp_path / "ddpm-base"


def same_weights(a, b, atol=1e-6) -> bool:
    b = b.state_dict()
    return all(torch.allclose(value, b[key], atol=atol) for key, value in a.state_dict().items())


def test_fine_tuning_starts_from_a_diffusers_ddpm_pipeline_and_keeps_its_schedule(ddpm_base, tmp_path):
    flags = ["--train_data_dir", str(FACES), "--learning_rate", NEGLIGIBLE_RATE]
    result = train(parse_training_arguments(fine_tune(tmp_path / "tuned", ddpm_base, *flags)))

    base = DDPMPipeline.from_pretrained(ddpm_base)
    tuned = FaceDiffPipeline.from_pretrained(tmp_path / "tuned")
    assert same_weights(result.unet, base.unet)  # the trained weights started from the base's
    assert same_weights(tuned.unet, base.unet)  # and the EMA, which the pipeline is saved with
    config = tuned.scheduler.config
    assert (config.beta_end, config.variance_type, config.clip_sample) == (0.012, "fixed_small", True)
    assert tuned.unet.config.sample_size == 16  # the base's resolution, with no --resolution given
    card = (tmp_path / "tuned" / "README.md").read_text()
    assert "| fine-tuned from | the local pipeline `ddpm-base` |" in card
    assert "base_model" not in ModelCard(card).data.to_dict()  # a local path is no Hub model tree entry

    AcceleratorState._reset_state(reset_partial_state=True)
    scratch = train(parse_training_arguments(tiny_run(tmp_path / "scratch", *flags)))
    assert not same_weights(scratch.unet, base.unet)


def test_sampling_flags_change_the_bases_sampler_and_keep_its_schedule(ddpm_base, tmp_path):
    flags = ["--train_data_dir", str(FACES), "--max_train_steps", "1", "--clip_sample", "false"]
    train(parse_training_arguments(fine_tune(tmp_path / "tuned", ddpm_base, *flags, "--variance_type", "fixed_large")))
    config = FaceDiffPipeline.from_pretrained(tmp_path / "tuned").scheduler.config
    assert (config.beta_end, config.variance_type, config.clip_sample) == (0.012, "fixed_large", False)


def test_fine_tuning_from_a_hub_repo_records_it_as_the_base_model(ddpm_base, tmp_path):
    cache = tmp_path / "hub-cache"
    lay_out_as_hub_cache(ddpm_base, cache, "someone/ddpm-faces")
    flags = ["--train_data_dir", str(FACES), "--cache_dir", str(cache), "--max_train_steps", "2"]
    train(parse_training_arguments(fine_tune(tmp_path / "tuned", "someone/ddpm-faces", *flags)))

    card = ModelCard.load(tmp_path / "tuned" / "README.md")
    assert card.data.base_model == "someone/ddpm-faces"
    assert "[someone/ddpm-faces](https://huggingface.co/someone/ddpm-faces)" in card.text


def test_a_fine_tuned_facediff_pipeline_resumes_and_extends(ddpm_base, tmp_path):
    first = tmp_path / "first"
    train(parse_training_arguments(fine_tune(first, ddpm_base, "--train_data_dir", str(FACES))))
    flags = ["--train_data_dir", str(FACES), "--max_train_steps", "2"]
    AcceleratorState._reset_state(reset_partial_state=True)
    train(parse_training_arguments(fine_tune(tmp_path / "second", first, *flags)))
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = fine_tune(tmp_path / "second", first, *flags[:-1], "4", "--resume_from_checkpoint", "latest")
    assert train(parse_training_arguments(resumed)).global_step == 4


def test_gray_images_are_converted_for_an_rgb_model(tmp_path):
    torch.manual_seed(4)
    FaceDiffPipeline(unet=tiny_unet(3), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "rgb-base")
    train(
        parse_training_arguments(fine_tune(tmp_path / "tuned", tmp_path / "rgb-base", "--train_data_dir", str(FACES)))
    )
    pipeline = FaceDiffPipeline.from_pretrained(tmp_path / "tuned")
    assert pipeline(num_inference_steps=2, output_type="np").images.shape[-1] == 3


def refused(tmp_path, base, *flags, message):
    """The run is refused with `message`, and nothing under tmp_path is written (not even --output_dir)."""
    before = folder_state(tmp_path)
    with pytest.raises(ValueError, match=message):
        train(parse_training_arguments(fine_tune(tmp_path / "out", base, "--train_data_dir", str(FACES), *flags)))
    assert folder_state(tmp_path) == before


def test_rgb_images_train_a_gray_model_only_when_asked(ddpm_base, tmp_path):
    flags = ["--train_data_dir", str(RGB_FACES)]
    refused(tmp_path, ddpm_base, *flags, message="is a gray model and the images are RGB: pass --num_channels 1")
    AcceleratorState._reset_state(reset_partial_state=True)
    train(parse_training_arguments(fine_tune(tmp_path / "gray", ddpm_base, *flags, "--num_channels", "1")))
    assert FaceDiffPipeline.from_pretrained(tmp_path / "gray").unet.config.in_channels == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resolution", "32"], "was trained at 16x16, not at --resolution 32: pass --resolution 16, or leave it out"),
        (["--num_channels", "3"], "is a gray model, not --num_channels 3: pass --num_channels 1, or leave it out"),
        (["--prediction_type", "v_prediction"], "learned with prediction_type epsilon, not --prediction_type v_pred"),
        (["--ddpm_num_steps", "500"], "learned with num_steps 1000, not --ddpm_num_steps 500: pass --ddpm_num_steps"),
    ],
)
def test_settings_the_base_does_not_fit_are_refused_naming_the_fix(ddpm_base, tmp_path, flags, message):
    refused(tmp_path, ddpm_base, *flags, message=message)


def test_pickle_only_weights_are_refused_with_the_conversion_command(tmp_path):
    torch.manual_seed(5)
    base = tmp_path / "pickled"
    DDPMPipeline(unet=tiny_unet(1), scheduler=DDPMScheduler()).save_pretrained(base, safe_serialization=False)
    conversion = f"DDPMPipeline.from_pretrained('{base}', use_safetensors=False).save_pretrained('pickled-safetensors')"
    refused(tmp_path, base, message=f"pickle only .* convert them once with `python -c .*{re.escape(conversion)}")


def test_every_ddpm_scheduler_setting_of_the_base_is_kept(tmp_path):
    scheduler = DDPMScheduler(thresholding=True, sample_max_value=1.5, trained_betas=[0.01] * 1000, steps_offset=1)
    DDPMPipeline(unet=tiny_unet(1), scheduler=scheduler).save_pretrained(tmp_path / "base")
    flags = ["--train_data_dir", str(FACES), "--max_train_steps", "1"]
    train(parse_training_arguments(fine_tune(tmp_path / "tuned", tmp_path / "base", *flags)))
    config = FaceDiffPipeline.from_pretrained(tmp_path / "tuned").scheduler.config
    assert {key: config[key] for key in scheduler.config if not key.startswith("_")} == {
        key: value for key, value in scheduler.config.items() if not key.startswith("_")
    }


def test_a_base_with_a_scheduler_facediff_refuses_is_refused(tmp_path):
    # fixed_large_log: DDPMScheduler.step takes the square root of its negative log-variance.
    scheduler = DDPMScheduler(variance_type="fixed_large_log")
    DDPMPipeline(unet=tiny_unet(1), scheduler=scheduler).save_pretrained(tmp_path / "base")
    refused(tmp_path, tmp_path / "base", message=r"its scheduler config is not one facediff can train \(variance_type")


def test_a_base_with_a_learned_variance_type_is_refused(tmp_path):
    DDPMPipeline(unet=tiny_unet(1), scheduler=DDPMScheduler(variance_type="learned_range")).save_pretrained(
        tmp_path / "base"
    )
    refused(tmp_path, tmp_path / "base", message="variance_type learned_range is learned, and facediff trains noise")


def test_a_base_with_learned_variances_is_refused(tmp_path):
    unet = tiny_unet(1)
    unet.register_to_config(out_channels=2)
    unet.save_pretrained(tmp_path / "base" / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "base" / "scheduler")
    refused(tmp_path, tmp_path / "base", message="outputs 2 channels for 1 in")


def test_a_folder_without_a_model_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    refused(tmp_path, tmp_path / "empty", message="no UNet and scheduler config there")


def test_a_base_and_a_model_config_are_refused_together(ddpm_base, tmp_path):
    with pytest.raises(ValueError, match="pass one of them"):
        parse_training_arguments(tiny_run(tmp_path / "out", "--pretrained_model_name_or_path", str(ddpm_base)))
