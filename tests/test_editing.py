"""Inpainting, image-to-image and interpolation: the pipelines against diffusers' RePaintPipeline, FaceDiffPipeline
and DDIMPipeline, the image conversion against training's, and the `facediff inpaint / edit / interpolate` commands
with their bad-input catalogue."""

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, RePaintPipeline, RePaintScheduler
from facediff.pipelines import pipeline_facediff_img2img
from facediff.pipelines.pipeline_facediff_inpaint import repaint_schedule
from facediff.pipelines.pipeline_facediff_interpolate import slerp
from PIL import Image

from facediff import (
    FaceDiffImg2ImgPipeline,
    FaceDiffInpaintPipeline,
    FaceDiffInterpolationPipeline,
    FaceDiffPipeline,
    FaceDiffScheduler,
)
from facediff.cli import main
from facediff.data import to_pixels
from facediff.model_card import pipeline_model_card

from .conftest import FACES, RGB_FACES, folder_state, tiny_unet


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def editing(pipeline_class, num_train_timesteps: int = 100, channels: int = 1, **scheduler_config):
    torch.manual_seed(0)
    scheduler = FaceDiffScheduler(num_train_timesteps=num_train_timesteps, **scheduler_config)
    pipeline = pipeline_class(unet=tiny_unet(channels), scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def face(index: int = 0) -> Image.Image:
    """A 64x64 gray face of the test data (the model is 16x16)."""
    return Image.open(FACES / f"{index:03d}.png")


def eyes_mask(size=(64, 64)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, size[1] // 2))
    return mask


def count_unet_calls(pipeline, monkeypatch) -> list[int]:
    calls = []
    forward = type(pipeline.unet).forward

    def counting(unet, sample, timestep, *args, **kwargs):
        calls.append(int(timestep))
        return forward(unet, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(type(pipeline.unet), "forward", counting)
    return calls


# Inpainting


@pytest.mark.filterwarnings("ignore:The preprocess method is deprecated:FutureWarning")  # RePaintPipeline's own
@pytest.mark.parametrize("jump_length, jump_n_sample", [(1, 1), (3, 3), (10, 2)])
def test_inpainting_equals_diffusers_repaint_pipeline(jump_length, jump_n_sample):
    """Same UNet, image, mask (inverted: RePaint keeps its 1s) and generator, on the chain where both samplers are
    the same update: the full chain (RePaint respaces by multiples of T // N and re-noises in T // N single steps,
    facediff by the sampler's own spacing and one jump by (3)), DDIM's eta 0 (RePaintScheduler's reverse step is
    DDIM's), no clipping. The difference is the schedules' rounding: float32 in diffusers, float64 in facediff."""
    pipeline = editing(FaceDiffInpaintPipeline, 40, eta=0.0)
    image = torch.rand(2, 1, 16, 16, generator=seeded(1))
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 4:10, 3:12] = 1
    mask[1, :, 9:, :] = 1
    ours = pipeline(
        image=image,
        mask_image=mask,
        jump_length=jump_length,
        jump_n_sample=jump_n_sample,
        generator=seeded(0),
        output_type="np",
    ).images
    scheduler = RePaintScheduler.from_config(pipeline.scheduler.config, clip_sample=False)
    repaint = RePaintPipeline(unet=pipeline.unet, scheduler=scheduler)
    repaint.set_progress_bar_config(disable=True)
    theirs = repaint(
        image=image * 2 - 1,
        mask_image=1 - mask,
        num_inference_steps=40,
        eta=0.0,
        jump_length=jump_length,
        jump_n_sample=jump_n_sample,
        generator=seeded(0),
        output_type="np",
    ).images
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    kept = (mask == 0).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours[kept], image.permute(0, 2, 3, 1).numpy()[kept], atol=1e-6)
    assert np.abs(ours - image.permute(0, 2, 3, 1).numpy())[~kept].mean() > 0.05


@pytest.mark.parametrize("steps, jump_length, jump_n_sample", [(250, 10, 10), (40, 3, 3), (7, 10, 2), (1000, 5, 4)])
def test_repaint_schedule_is_repaint_schedulers(steps, jump_length, jump_n_sample):
    scheduler = RePaintScheduler()
    scheduler.set_timesteps(steps, jump_length, jump_n_sample)
    expected = (scheduler.timesteps // (1000 // steps)).tolist()
    assert repaint_schedule(steps, jump_length, jump_n_sample) == expected


def test_inpainting_on_a_respaced_document_chain_keeps_the_known_pixels(monkeypatch):
    # The model's own sampler (the document's update, fixed_large), respaced to 10 steps; an RGB face of another
    # size for a gray model, converted as training converts it.
    pipeline = editing(FaceDiffInpaintPipeline)
    image = Image.open(RGB_FACES / "000.jpg")
    calls = count_unet_calls(pipeline, monkeypatch)
    result = pipeline(image=image, mask_image=eyes_mask(image.size), num_inference_steps=10, jump_length=3,
                      jump_n_sample=2, generator=seeded(0)).images[0]  # fmt: skip
    path = repaint_schedule(10, 3, 2)
    downs = [j for j, before in zip(path, [10, *path], strict=False) if j < before]
    # One model call per step down (the 10 of the chain, and 3 jumps of 3 run again); the steps back up need none.
    assert len(calls) == len(downs) == 19
    assert result.mode == "L" and result.size == (16, 16)
    filled, original = np.asarray(result, dtype=int), to_pixels(image, 1, 16)[0].astype(int)
    repainted = pipeline.preprocess_mask(eyes_mask(image.size), image, 1)[0, 0].numpy() == 1
    assert np.array_equal(filled[~repainted], original[~repainted])
    assert np.abs(filled - original)[repainted].mean() > 10


def test_a_mask_pixel_is_repainted_when_any_part_of_it_is_white():
    pipeline = editing(FaceDiffInpaintPipeline)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 21, 21, 22))  # one pixel of 64x64: 1/16 of a model pixel
    mask.paste(100, (40, 40, 50, 50))  # gray below 128 counts as black
    repaint = pipeline.preprocess_mask(mask, face(), 1)[0, 0]
    assert repaint.sum() == 1 and repaint[5, 5] == 1


@pytest.mark.parametrize(
    "mask, message",
    [
        (eyes_mask((64, 48)), "The mask is 64x48 but the image is 64x64: draw the mask at the image's size"),
        (Image.new("L", (64, 64), 0), "The mask marks nothing to repaint at the model's 16x16: paint white"),
        (Image.new("L", (64, 64), 255), "The mask marks every pixel to repaint, so nothing of the image is kept"),
        ([eyes_mask()] * 2, "Got 2 masks for 1 images: pass one for all, or one per image."),
    ],
)
def test_bad_masks_are_refused_before_sampling(mask, message, monkeypatch):
    pipeline = editing(FaceDiffInpaintPipeline)
    calls = count_unet_calls(pipeline, monkeypatch)
    with pytest.raises(ValueError, match=message):
        pipeline(image=face(), mask_image=mask, num_inference_steps=2)
    assert calls == []


# Image-to-image


def test_strength_0_returns_the_image_as_the_model_sees_it(monkeypatch):
    pipeline = editing(FaceDiffImg2ImgPipeline)
    calls = count_unet_calls(pipeline, monkeypatch)
    image = Image.open(RGB_FACES / "001.jpg")  # RGB, 200x200, for a gray 16x16 model
    edited = pipeline(image=image, strength=0.0, num_inference_steps=10, output_type="np").images
    assert calls == []
    np.testing.assert_allclose(edited[0, :, :, 0] * 255, to_pixels(image, 1, 16)[0], atol=1e-3)


def test_strength_1_is_plain_sampling_with_the_same_generator():
    pipeline = editing(FaceDiffImg2ImgPipeline, channels=3)
    sampler = FaceDiffPipeline(unet=pipeline.unet, scheduler=pipeline.scheduler)
    sampler.set_progress_bar_config(disable=True)
    generators = [seeded(3), seeded(4)]
    edited = pipeline(image=[face(0), face(1)], strength=1.0, num_inference_steps=10, generator=generators,
                      output_type="np").images  # fmt: skip
    sampled = sampler(batch_size=2, num_inference_steps=10, generator=[seeded(3), seeded(4)], output_type="np",
                      memory_format=torch.contiguous_format).images  # fmt: skip
    np.testing.assert_array_equal(edited, sampled)


def test_a_middle_strength_runs_the_last_steps_of_the_chain_from_the_noised_image(monkeypatch):
    pipeline = editing(FaceDiffImg2ImgPipeline)
    calls = count_unet_calls(pipeline, monkeypatch)
    image = torch.tensor(to_pixels(face(), 1, 16)).float()[None] / 255
    edited = pipeline(image=image, strength=0.3, num_inference_steps=10, generator=seeded(0), output_type="pt")
    pipeline.scheduler.set_timesteps(10)
    assert calls == pipeline.scheduler.timesteps[-3:].tolist()  # int(0.3 * 10) steps, as diffusers' img2img
    fresh = pipeline(image=image, strength=1.0, num_inference_steps=10, generator=seeded(0), output_type="pt")
    # Noised to step 33 of 100 (alphabar 0.73), the face survives: closer to it than a fresh sample is.
    assert (edited.images - image).abs().mean() < 0.5 * (fresh.images - image).abs().mean()


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_strength_outside_0_1_is_refused(strength):
    with pytest.raises(ValueError, match=rf"strength must lie in \[0, 1\], got {strength}"):
        editing(FaceDiffImg2ImgPipeline)(image=face(), strength=strength)


# Interpolation


def test_ddim_inversion_round_trip_returns_the_images():
    """Invert two faces to x_T and decode them: the first and last frames. The error is DDIM inversion's (each
    inverted step evaluates the model at the level it leaves), measured with this random UNet on a 100-step schedule
    over 3 seeds: at 25 steps 0.031-0.054 at most and 0.006-0.008 on average on [0, 1], about halved at 50 steps,
    0.15-0.25 at most at 5 steps. A random UNet predicts no noise, so on a 1000-step schedule (alphabar_T 4e-5) its
    inversion does not come back at all; the trained Olivetti model's error is in docs/editing.md."""
    pipeline = editing(FaceDiffInterpolationPipeline)
    images = torch.from_numpy(np.stack([to_pixels(face(index), 1, 16) for index in (0, 1)])).float() / 255
    frames = {steps: pipeline(image=images, num_frames=2, num_inference_steps=steps, output_type="pt").images
              for steps in (10, 25, 50)}  # fmt: skip
    errors = {steps: (frames[steps] - images).abs() for steps in frames}
    assert errors[25].max() < 0.08 and errors[25].mean() < 0.012
    assert errors[50].mean() < 0.6 * errors[25].mean() < 0.6**2 * errors[10].mean()


def test_interpolating_two_seeds_starts_and_ends_at_diffusers_ddim_samples():
    pipeline = editing(FaceDiffInterpolationPipeline)
    frames = pipeline(generator=[seeded(5), seeded(6)], num_frames=4, num_inference_steps=10, output_type="np")
    ddim = DDIMPipeline(unet=pipeline.unet, scheduler=DDIMScheduler.from_config(
        pipeline.scheduler.config, timestep_spacing="trailing", clip_sample=False))  # fmt: skip
    ddim.set_progress_bar_config(disable=True)
    for frame, seed in ((0, 5), (-1, 6)):
        reference = ddim(generator=seeded(seed), eta=0.0, num_inference_steps=10, output_type="np").images[0]
        np.testing.assert_allclose(frames.images[frame], reference, atol=2e-5)
    steps = np.abs(np.diff(frames.images, axis=0)).mean(axis=(1, 2, 3))
    assert (steps > 0.005).all()  # every frame moves on


def test_slerp_keeps_the_norm_of_orthogonal_ends():
    start, end = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    assert torch.equal(slerp(start, end, 0.0), start)
    torch.testing.assert_close(slerp(start, end, 1.0), end)
    torch.testing.assert_close(slerp(start, end, 0.5), torch.tensor([3.0, 3.0]) / 2**0.5)  # not (1.5, 1.5)


def test_interpolation_needs_two_ends_and_two_frames():
    pipeline = editing(FaceDiffInterpolationPipeline)
    with pytest.raises(ValueError, match="num_frames must be at least 2, both ends included; got 1"):
        pipeline(num_frames=1)
    with pytest.raises(ValueError, match="Interpolation needs two images, got 3"):
        pipeline(image=[face(0), face(1), face(2)], num_inference_steps=2)


# Conversion and loading


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK"])
def test_the_remote_code_converts_8_bit_images_as_training_does(mode, channels):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8), "RGBA").convert(mode)
    pipeline = pipeline_facediff_img2img.FaceDiffImg2ImgPipeline(
        unet=tiny_unet(channels), scheduler=FaceDiffScheduler()
    )
    np.testing.assert_array_equal(pipeline.pixels(image), to_pixels(image, channels, 16))


def test_installed_pipelines_convert_16_bit_gray_as_training_does():
    image = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))  # mode I;16
    installed = editing(FaceDiffImg2ImgPipeline)
    remote = pipeline_facediff_img2img.FaceDiffImg2ImgPipeline(unet=installed.unet, scheduler=installed.scheduler)
    np.testing.assert_array_equal(installed.pixels(image), to_pixels(image, 1, 16))
    assert installed.pixels(image).max() > 200  # scaled from 16 bits
    assert (remote.pixels(image) == 255).mean() > 0.9  # PIL's conversion clips at 255: the remote code's is 8-bit


def test_editing_pipelines_load_from_a_saved_model_and_from_a_pipeline(tmp_path):
    torch.manual_seed(0)
    model = FaceDiffPipeline(unet=tiny_unet(1), scheduler=FaceDiffScheduler(num_train_timesteps=100))
    model.save_pretrained(tmp_path / "model")
    for name in ("pipeline_facediff_inpaint.py", "pipeline_facediff_img2img.py", "pipeline_facediff_interpolate.py"):
        assert (tmp_path / "model" / name).is_file()
    loaded = FaceDiffImg2ImgPipeline.from_pretrained(tmp_path / "model")
    assert loaded.name_or_path == str(tmp_path / "model")
    derived = FaceDiffImg2ImgPipeline.from_pipe(model)
    assert derived.unet is model.unet and derived.scheduler is model.scheduler

    def edit(pipeline):
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(image=face(), strength=0.5, num_inference_steps=4, generator=seeded(0), output_type="np")

    loaded_weights, derived_weights = loaded.unet.state_dict(), derived.unet.state_dict()
    assert all(torch.equal(loaded_weights[name], derived_weights[name]) for name in derived_weights)
    # Equal weights, but not always equal bits out: oneDNN may pick other kernels for the freshly loaded tensors
    # (1e-7 apart on an AMD EPYC with AVX512-BF16).
    np.testing.assert_allclose(edit(loaded).images, edit(derived).images, atol=1e-6, rtol=0)


# The commands


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("editing") / "model"
    FaceDiffPipeline(unet=tiny_unet(1), scheduler=FaceDiffScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("masks") / "eyes.png"
    eyes_mask().save(path)
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=int)


def test_inpaint_command_writes_the_results_and_a_strip(model_folder, mask_file, tmp_path):
    out = tmp_path / "out"
    flags = ["--image", str(FACES / "000.png"), "--mask", str(mask_file), "--steps", "5", "--jump-n-sample", "2"]
    assert main(["inpaint", str(model_folder), *flags, "--num-images", "2", "--seed", "3", "--out", str(out)]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["00000.png", "00001.png", "strip.png"]
    assert Image.open(out / "strip.png").size == (64, 16)  # the face, the part kept, two results
    inpainter = FaceDiffInpaintPipeline.from_pretrained(model_folder)
    inpainter.set_progress_bar_config(disable=True)
    for index in (0, 1):
        alone = inpainter(image=face(), mask_image=eyes_mask(), num_inference_steps=5, jump_n_sample=2,
                          generator=seeded(3 + index)).images[0]  # fmt: skip
        assert np.abs(pixels(out / f"{index:05d}.png") - np.asarray(alone, dtype=int)).max() <= 1


def test_edit_command_writes_one_result_per_strength_and_a_strip(model_folder, tmp_path):
    out = tmp_path / "out"
    flags = ["--image", str(FACES / "001.png"), "--strength", "0", "0.5", "--steps", "4", "--out", str(out)]
    assert main(["edit", str(model_folder), *flags]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["strength-0.5.png", "strength-0.png", "strip.png"]
    assert np.array_equal(pixels(out / "strength-0.png"), to_pixels(face(1), 1, 16)[0])
    assert Image.open(out / "strip.png").size == (48, 16)


@pytest.mark.parametrize(
    "ends", [["--seeds", "0", "1"], ["--image", str(FACES / "000.png"), "--image", str(FACES / "001.png")]]
)
def test_interpolate_command_writes_the_frames_and_a_strip(model_folder, tmp_path, ends):
    out = tmp_path / "out"
    assert main(["interpolate", str(model_folder), *ends, "--frames", "3", "--steps", "5", "--out", str(out)]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["00000.png", "00001.png", "00002.png", "strip.png"]
    assert Image.open(out / "strip.png").size == (48, 16)


@pytest.mark.parametrize(
    "command, message",
    [
        (
            ["inpaint", "--image", "{face}", "--mask", "{small_mask}"],
            "error: The mask is 64x48 but the image is 64x64: draw the mask at the image's size, white where to "
            "repaint and black where to keep.",
        ),
        (
            ["inpaint", "--image", "{face}", "--mask", "{black}"],
            "error: The mask marks nothing to repaint at the model's 16x16: paint white where to repaint.",
        ),
        (
            ["inpaint", "--image", "{face}", "--mask", "{white}"],
            "error: The mask marks every pixel to repaint, so nothing of the image is kept: that is sampling "
            "(FaceDiffPipeline, `facediff sample`); leave black what to keep.",
        ),
        (
            ["inpaint", "--image", "{missing}", "--mask", "{black}"],
            "error: --image {missing} does not exist: pass an image file (PNG, JPEG, ...).",
        ),
        (
            ["edit", "--image", "{not_an_image}"],
            "error: --image {not_an_image} is not an image PIL can read (UnidentifiedImageError): pass a PNG, "
            "JPEG, ... file.",
        ),
        (
            ["interpolate", "--image", "{face}"],
            "error: --image was given 1 time(s): pass two images (--image A --image B), or --seeds S1 S2.",
        ),
        (
            ["edit", "--image", "{face}", "--strength", "1.5"],
            "facediff edit: error: argument --strength: '1.5' is not a number in [0, 1] (0 returns the image, 1 draws "
            "a new one)",
        ),
        (
            ["interpolate", "--seeds", "0", "1", "--frames", "1"],
            "facediff interpolate: error: argument --frames: '1' is not an integer of at least 2",
        ),
    ],
)
def test_bad_inputs_give_one_line_and_write_nothing(model_folder, tmp_path, capsys, command, message):
    files = {
        "face": FACES / "000.png",
        "small_mask": tmp_path / "small.png",
        "black": tmp_path / "black.png",
        "white": tmp_path / "white.png",
        "missing": tmp_path / "missing.png",
        "not_an_image": tmp_path / "notes.png",
    }
    eyes_mask((64, 48)).save(files["small_mask"])
    Image.new("L", (64, 64), 0).save(files["black"])
    Image.new("L", (64, 64), 255).save(files["white"])
    files["not_an_image"].write_text("not a PNG")
    argv = [part.format(**files) for part in command]
    argv = [argv[0], str(model_folder), *argv[1:], "--out", str(tmp_path / "out")]
    before = folder_state(model_folder)
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's refusals: usage, then the error line
        code = exit_info.code
    assert code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == message.format(**files)
    assert message.startswith("facediff") or len(lines) == 1  # argparse's usage comes before its error line
    assert not (tmp_path / "out").exists() and folder_state(model_folder) == before


def test_an_out_with_earlier_results_is_refused_unless_overwrite(model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    flags = ["edit", str(model_folder), "--image", str(FACES / "000.png"), "--steps", "2", "--out", str(out)]
    assert main([*flags, "--strength", "0.2", "0.4", "0.6"]) == 0
    before = folder_state(out)
    capsys.readouterr()
    assert main([*flags, "--strength", "0.5"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out {out} already holds results (strength-0.2.png, strength-0.4.png, ...): choose a new or empty "
        "--out, or pass --overwrite to replace them."
    ]
    assert folder_state(out) == before
    assert main([*flags, "--strength", "0.5", "--overwrite"]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["strength-0.5.png", "strip.png"]


def test_the_model_card_shows_the_editing_uses_and_its_code_runs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    pipeline = FaceDiffPipeline(unet=tiny_unet(1), scheduler=FaceDiffScheduler(num_train_timesteps=10))
    card = pipeline_model_card(pipeline, "someone/faces").text
    assert 'from_pretrained("someone/faces", custom_pipeline="pipeline_facediff_inpaint",' in card
    snippet = card.split("## Editing faces")[1].split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    face(0).save("face.png")
    face(1).save("other.png")
    eyes_mask().save("mask.png")
    namespace = {"pipeline": pipeline}
    exec(snippet, namespace)
    assert len(namespace["filled"]) == len(namespace["cleaned"]) == 1 and len(namespace["frames"]) == 8
