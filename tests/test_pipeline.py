"""FaceDiffPipeline: sampling, output types, saving and every way of loading it back."""

import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from PIL import Image

from facediff import (
    FaceDiffImg2ImgPipeline,
    FaceDiffInpaintPipeline,
    FaceDiffInterpolationPipeline,
    FaceDiffPipeline,
    FaceDiffScheduler,
)

from .conftest import folder_state, lay_out_as_hub_cache, tiny_unet

STEPS = 8


def sample(pipeline, seed=0, batch_size=2, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "np")
    return pipeline(batch_size=batch_size, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_same_seed_same_images_other_seed_other_images(gray_pipeline):
    first, again, other = sample(gray_pipeline, 0), sample(gray_pipeline, 0), sample(gray_pipeline, 1)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 0.05


def test_one_generator_per_image_gives_each_image_alone(rgb_pipeline):
    batch = rgb_pipeline(
        batch_size=3,
        generator=[torch.Generator().manual_seed(seed) for seed in (5, 6, 7)],
        num_inference_steps=STEPS,
        output_type="np",
    ).images
    for index, seed in enumerate((5, 6, 7)):
        alone = sample(rgb_pipeline, seed, batch_size=1)
        np.testing.assert_allclose(batch[index], alone[0], atol=1e-4)  # batched convolutions round differently


def test_wrong_number_of_generators_is_refused(gray_pipeline):
    with pytest.raises(ValueError, match="one per image"):
        gray_pipeline(batch_size=3, generator=[torch.Generator()] * 2, num_inference_steps=2)


def test_an_empty_batch_is_refused(gray_pipeline):
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        gray_pipeline(batch_size=0, num_inference_steps=2)


@pytest.mark.parametrize("fixture,mode,channels", [("gray_pipeline", "L", 1), ("rgb_pipeline", "RGB", 3)])
def test_output_types(fixture, mode, channels, request):
    pipeline = request.getfixturevalue(fixture)
    pil = sample(pipeline, output_type="pil")
    array = sample(pipeline, output_type="np")
    tensor = sample(pipeline, output_type="pt")
    assert [image.mode for image in pil] == [mode, mode] and pil[0].size == (16, 16)
    assert array.shape == (2, 16, 16, channels) and array.min() >= 0 and array.max() <= 1
    assert tensor.shape == (2, channels, 16, 16) and isinstance(tensor, torch.Tensor)
    np.testing.assert_allclose(tensor.permute(0, 2, 3, 1).numpy(), array, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pil[1]).reshape(16, 16, channels), np.round(array[1] * 255), atol=1)


def test_unknown_output_type_is_refused(gray_pipeline):
    with pytest.raises(ValueError, match="output_type"):
        gray_pipeline(num_inference_steps=1, output_type="jpeg")


def test_a_bfloat16_unet_computes_in_bfloat16_on_a_float32_chain(gray_pipeline, monkeypatch):
    gray_pipeline.to(torch.bfloat16)
    seen = []
    forward = type(gray_pipeline.unet).forward

    def recording(unet, sample, timestep, *args, **kwargs):
        seen.append(sample.dtype)
        output = forward(unet, sample, timestep, *args, **kwargs)
        seen.append(output.sample.dtype)
        return output

    monkeypatch.setattr(type(gray_pipeline.unet), "forward", recording)
    images = sample(gray_pipeline, output_type="pt")
    assert set(seen) == {torch.bfloat16} and len(seen) == 2 * STEPS
    assert images.dtype == torch.float32 and gray_pipeline.unet.dtype == torch.bfloat16


def test_save_and_load_round_trip(gray_pipeline, tmp_path):
    gray_pipeline.scheduler = FaceDiffScheduler(beta_end=0.015, prediction_type="v_prediction")
    gray_pipeline.save_pretrained(tmp_path / "model")
    files = sorted(str(path.relative_to(tmp_path / "model")) for path in (tmp_path / "model").rglob("*"))
    assert files == [
        "image_io_facediff.py",
        "model_index.json",
        "pipeline_facediff.py",
        "pipeline_facediff_img2img.py",
        "pipeline_facediff_inpaint.py",
        "pipeline_facediff_interpolate.py",
        "scheduler",
        "scheduler/scheduler_config.json",
        "scheduler/scheduling_facediff.py",
        "scheduling_facediff.py",
        "unet",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    loaded = FaceDiffPipeline.from_pretrained(tmp_path / "model")
    assert type(loaded) is FaceDiffPipeline and type(loaded.scheduler) is FaceDiffScheduler
    assert loaded.scheduler.config.prediction_type == "v_prediction" and loaded.scheduler.config.beta_end == 0.015
    np.testing.assert_array_equal(sample(loaded), sample(gray_pipeline))


def test_saved_remote_code_is_the_package_source(gray_pipeline, tmp_path):
    import facediff.pipelines.pipeline_facediff as pipeline_module
    import facediff.pipelines.scheduling_facediff as scheduler_module

    gray_pipeline.save_pretrained(tmp_path)
    pipeline_source = open(pipeline_module.__file__).read()
    scheduler_source = open(scheduler_module.__file__).read()
    assert (tmp_path / "pipeline_facediff.py").read_text() == pipeline_source
    for name in pipeline_module.SIBLING_MODULES:
        assert (tmp_path / name).read_text() == Path(pipeline_module.__file__).with_name(name).read_text()
    assert (tmp_path / "scheduler" / "scheduling_facediff.py").read_text() == scheduler_source
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_facediff", "FaceDiffPipeline"]
    assert index["scheduler"] == ["scheduling_facediff", "FaceDiffScheduler"]
    assert index["unet"] == ["diffusers", "UNet2DModel"]


def test_save_keeps_other_files_and_replaces_the_old_pipeline(gray_pipeline, rgb_pipeline, tmp_path):
    (tmp_path / "checkpoint-100").mkdir()
    (tmp_path / "checkpoint-100" / "state.bin").write_bytes(b"keep me")
    (tmp_path / "logs.txt").write_text("keep me too")
    rgb_pipeline.save_pretrained(tmp_path)
    gray_pipeline.save_pretrained(tmp_path)
    assert (tmp_path / "checkpoint-100" / "state.bin").read_bytes() == b"keep me"
    assert (tmp_path / "logs.txt").read_text() == "keep me too"
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".facediff")]
    assert FaceDiffPipeline.from_pretrained(tmp_path).unet.config.in_channels == 1


def test_failed_save_leaves_the_previous_pipeline_intact(gray_pipeline, rgb_pipeline, tmp_path, monkeypatch):
    gray_pipeline.save_pretrained(tmp_path)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(rgb_pipeline.unet), "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        rgb_pipeline.save_pretrained(tmp_path)
    after = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert after == before


# Every refused load below also checks that the folder is left exactly as it was: loading never writes.


def test_plain_diffusers_refuses_the_folder_without_trust_remote_code(gray_pipeline, tmp_path):
    gray_pipeline.save_pretrained(tmp_path)
    before = folder_state(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path)
    assert folder_state(tmp_path) == before


def test_pickle_weights_are_refused_by_default(gray_pipeline, tmp_path):
    gray_pipeline.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").exists()
    before = folder_state(tmp_path)
    with pytest.raises(EnvironmentError, match="safetensors") as raised:
        FaceDiffPipeline.from_pretrained(tmp_path)
    assert "pass use_safetensors=False only if you trust the folder" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert folder_state(tmp_path) == before
    FaceDiffPipeline.from_pretrained(tmp_path, use_safetensors=False)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_weights_give_one_line_naming_the_folder(gray_pipeline, tmp_path, damage):
    gray_pipeline.save_pretrained(tmp_path)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    before = folder_state(tmp_path)
    with pytest.raises(OSError) as raised:
        FaceDiffPipeline.from_pretrained(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"{tmp_path}/unet: ") and "\n" not in message and "save it again" in message
    assert folder_state(tmp_path) == before


def test_invalid_scheduler_config_names_the_file(gray_pipeline, tmp_path):
    gray_pipeline.save_pretrained(tmp_path)
    config_path = tmp_path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["beta_end"] = 1e-5
    config_path.write_text(json.dumps(config))
    before = folder_state(tmp_path)
    with pytest.raises(ValueError, match=r"scheduler/scheduler_config.json: beta_end \(1e-05\) must be greater"):
        FaceDiffPipeline.from_pretrained(tmp_path)
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize(
    "key,entry,message",
    [
        (
            "scheduler",
            ["diffusers", "EulerDiscreteScheduler"],
            r"names scheduler=\['diffusers', 'EulerDiscreteScheduler'\], but .* needs FaceDiffScheduler or "
            "DDPMScheduler or DDIMScheduler or DPMSolverMultistepScheduler",
        ),
        ("unet", ["nowhere", "NoSuchModel"], r"names unet=\['nowhere', 'NoSuchModel'\], but .* needs UNet2DModel"),
    ],
)
def test_model_index_naming_other_classes_is_refused(gray_pipeline, tmp_path, key, entry, message):
    gray_pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index[key] = entry
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    before = folder_state(tmp_path)
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))}/model_index.json {message}"):
        FaceDiffPipeline.from_pretrained(tmp_path)
    assert folder_state(tmp_path) == before


def test_a_training_folder_without_a_pipeline_is_refused(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()  # a run stopped before its end has checkpoints only
    before = folder_state(tmp_path)
    with pytest.raises(
        OSError, match=f"no file named model_index.json found in directory {re.escape(str(tmp_path))}"
    ) as raised:
        FaceDiffPipeline.from_pretrained(tmp_path)
    assert "finish it with --resume_from_checkpoint latest" in str(raised.value) and "\n" not in str(raised.value)
    assert f"latest checkpoint with `facediff export {tmp_path} OUT`" in str(raised.value)
    assert folder_state(tmp_path) == before


def test_loads_a_hub_repo_id_from_the_hub_cache(gray_pipeline, tmp_path):
    gray_pipeline.save_pretrained(tmp_path / "model")
    lay_out_as_hub_cache(tmp_path / "model", tmp_path / "hub", "someone/faces")
    loaded = FaceDiffPipeline.from_pretrained("someone/faces", cache_dir=tmp_path / "hub")
    assert loaded.name_or_path == "someone/faces"
    np.testing.assert_array_equal(sample(loaded), sample(gray_pipeline))


# Each editing pipeline's call in the remote-code test, on a fixed image and mask (the model is 16x16 gray).
EDITING_CALLS_SOURCE = """
import torch
IMAGE = torch.linspace(0, 1, 256).reshape(1, 1, 16, 16)
MASK = torch.zeros(1, 1, 16, 16)
MASK[..., 4:8, 4:12] = 1
EDITING_CALLS = {
    "pipeline_facediff_inpaint": lambda pipeline: pipeline(image=IMAGE, mask_image=MASK, num_inference_steps=4,
        jump_n_sample=2, generator=torch.Generator().manual_seed(0), output_type="np"),
    "pipeline_facediff_img2img": lambda pipeline: pipeline(image=IMAGE, strength=0.5, num_inference_steps=4,
        generator=torch.Generator().manual_seed(0), output_type="np"),
    "pipeline_facediff_interpolate": lambda pipeline: pipeline(num_frames=3, num_inference_steps=4,
        generator=[torch.Generator().manual_seed(seed) for seed in (0, 1)], output_type="np"),
}
"""
EDITING_CALLS = {}
exec(EDITING_CALLS_SOURCE)  # defines EDITING_CALLS here too, for the installed pipelines' side of the test

REMOTE_LOAD = EDITING_CALLS_SOURCE + textwrap.dedent(
    """
    import json, sys
    sys.modules["facediff"] = None  # any `import facediff` now fails, as where it is not installed
    try:
        import facediff  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("facediff is importable")
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    classes = {}
    for name, model in json.loads(sys.argv[1]).items():
        pipeline = DiffusionPipeline.from_pretrained(model, trust_remote_code=True)
        classes[name] = f"{type(pipeline).__name__} {type(pipeline.scheduler).__name__}"
        generator = torch.Generator().manual_seed(0)
        images = pipeline(batch_size=2, generator=generator, num_inference_steps=8, output_type="np")
        np.save(f"{name}.npy", images.images)
        if name in json.loads(sys.argv[2]):  # and the editing pipelines the folder carries, on EDITING_CALLS' inputs
            for module, call in EDITING_CALLS.items():
                editing = DiffusionPipeline.from_pretrained(model, custom_pipeline=module, trust_remote_code=True)
                classes[f"{name} {module}"] = type(editing).__name__
                np.save(f"{name}-{module}.npy", call(editing).images)
        # The next model's remote code is imported afresh, as in a process of its own.
        for module in [module for module in sys.modules if module.startswith("diffusers_modules")]:
            del sys.modules[module]
    print(json.dumps(classes))
    """
)


class RemoteLoad(NamedTuple):
    """A saved pipeline, its folder, and what plain diffusers loaded from it and drew."""

    pipeline: FaceDiffPipeline
    folder: Path
    classes: str  # the pipeline's class and the scheduler's
    images: np.ndarray


@pytest.fixture(scope="module")
def loaded_without_facediff(tmp_path_factory) -> dict[str, RemoteLoad]:
    """A saved pipeline loaded by plain diffusers with trust_remote_code in a process where facediff cannot be
    imported (the process is the point), as a folder and as a Hub repo id in the Hub cache, and one with a diffusers
    scheduler swapped in: one process loads all three, as each load would start as slowly as the tests run."""
    root = tmp_path_factory.mktemp("remote-code")
    torch.manual_seed(0)
    pipeline = FaceDiffPipeline(unet=tiny_unet(1), scheduler=FaceDiffScheduler())
    ddim = DDIMScheduler.from_config(pipeline.scheduler.config, timestep_spacing="trailing")
    ddim_pipeline = FaceDiffPipeline(unet=pipeline.unet, scheduler=ddim)
    pipeline.save_pretrained(root / "model")
    ddim_pipeline.save_pretrained(root / "ddim-model")
    lay_out_as_hub_cache(root / "model", root / "hub", "someone/faces")
    models = {"folder": str(root / "model"), "hub": "someone/faces", "ddim": str(root / "ddim-model")}
    script = root / "remote_load.py"
    script.write_text(REMOTE_LOAD)
    result = subprocess.run(
        [sys.executable, str(script), json.dumps(models), json.dumps(["folder", "hub"])],
        cwd=root,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_CACHE": str(root / "hub"),
            "HF_MODULES_CACHE": str(root / "hf_modules"),  # the copied remote code, out of the user's cache
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    classes = json.loads(result.stdout.splitlines()[-1])
    loads = {
        "folder": RemoteLoad(pipeline, root / "model", classes["folder"], np.load(root / "folder.npy")),
        "hub": RemoteLoad(pipeline, root / "model", classes["hub"], np.load(root / "hub.npy")),
        "ddim": RemoteLoad(ddim_pipeline, root / "ddim-model", classes["ddim"], np.load(root / "ddim.npy")),
    }
    for name, module in itertools.product(("folder", "hub"), EDITING_CALLS):
        remote = np.load(root / f"{name}-{module}.npy")
        loads[f"{name} {module}"] = RemoteLoad(pipeline, root / "model", classes[f"{name} {module}"], remote)
    return loads


def test_plain_diffusers_loads_the_folder_as_remote_code_without_facediff(loaded_without_facediff):
    folder = loaded_without_facediff["folder"]
    assert folder.classes == "FaceDiffPipeline FaceDiffScheduler"
    np.testing.assert_array_equal(folder.images, sample(folder.pipeline))


def test_plain_diffusers_loads_a_hub_repo_id_as_remote_code_without_facediff(loaded_without_facediff):
    hub = loaded_without_facediff["hub"]
    assert hub.classes == "FaceDiffPipeline FaceDiffScheduler"
    np.testing.assert_array_equal(hub.images, sample(hub.pipeline))


@pytest.mark.parametrize("location", ["folder", "hub"])
@pytest.mark.parametrize(
    "module, installed_class",
    [
        ("pipeline_facediff_inpaint", FaceDiffInpaintPipeline),
        ("pipeline_facediff_img2img", FaceDiffImg2ImgPipeline),
        ("pipeline_facediff_interpolate", FaceDiffInterpolationPipeline),
    ],
)
def test_plain_diffusers_loads_the_editing_pipelines_as_remote_code_without_facediff(
    loaded_without_facediff, location, module, installed_class
):
    remote = loaded_without_facediff[f"{location} {module}"]
    assert remote.classes == installed_class.__name__
    installed = installed_class.from_pipe(remote.pipeline)
    installed.set_progress_bar_config(disable=True)
    # The order of float reductions varies with the threads each process gets and the kernels oneDNN picks (1e-7
    # apart on an AMD EPYC with AVX512-BF16); interpolation runs the chain up (inversion) and down again, where
    # that moves a few pixels by up to 1e-5.
    tolerance = 1e-4 if module == "pipeline_facediff_interpolate" else 1e-6
    np.testing.assert_allclose(remote.images, EDITING_CALLS[module](installed).images, rtol=0, atol=tolerance)


def test_a_swapped_in_diffusers_scheduler_saves_and_loads_as_itself(loaded_without_facediff):
    ddim = loaded_without_facediff["ddim"]
    index = json.loads((ddim.folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert not (ddim.folder / "scheduler" / "scheduling_facediff.py").exists()

    loaded = FaceDiffPipeline.from_pretrained(ddim.folder)
    assert type(loaded.scheduler) is DDIMScheduler and loaded.scheduler.config.timestep_spacing == "trailing"
    np.testing.assert_array_equal(sample(loaded), sample(ddim.pipeline))
    assert ddim.classes == "FaceDiffPipeline DDIMScheduler"
    np.testing.assert_array_equal(ddim.images, sample(ddim.pipeline))


def test_pil_images_save_as_png(gray_pipeline, tmp_path):
    image = sample(gray_pipeline, output_type="pil")[0]
    image.save(tmp_path / "face.png")
    assert Image.open(tmp_path / "face.png").mode == "L"
