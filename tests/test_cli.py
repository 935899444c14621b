"""The `facediff sample` command and the sampler options it shares with `facediff eval`."""

from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from PIL import Image

from facediff import FaceDiffPipeline, FaceDiffScheduler, build_unet
from facediff.cli import main
from facediff.sample_grids import grid_shape


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=int)


def test_sample_writes_one_png_per_image_and_a_grid(gray_pipeline, tmp_path):
    gray_pipeline.save_pretrained(tmp_path / "model")
    flags = ["sample", str(tmp_path / "model"), "--num-images", "5", "--steps", "4", "--seed", "3"]
    assert main([*flags, "--batch-size", "2", "--out", str(tmp_path / "batched")]) == 0
    assert main([*flags, "--batch-size", "1", "--out", str(tmp_path / "single")]) == 0
    names = sorted(path.name for path in (tmp_path / "batched").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png", "00004.png", "grid.png"]
    assert Image.open(tmp_path / "batched" / "grid.png").size == (48, 32)  # 5 images of 16x16 on a 3x2 grid
    for name in names[:-1]:  # image i depends on its seed only, not on the batch it was drawn in
        assert np.abs(pixels(tmp_path / "batched" / name) - pixels(tmp_path / "single" / name)).max() <= 1


@pytest.mark.parametrize(
    ("num_images", "shape"), [(1, (1, 1)), (5, (2, 3)), (7, (3, 3)), (12, (3, 4)), (32, (4, 8)), (36, (6, 6))]
)
def test_grid_shape_fills_every_cell_when_a_near_square_grid_can(num_images, shape):
    assert grid_shape(num_images) == shape


def test_sampler_options(gray_pipeline, tmp_path):
    gray_pipeline.save_pretrained(tmp_path / "model")
    flags = ["sample", str(tmp_path / "model"), "--num-images", "3", "--steps", "10", "--seed", "1", "--threads", "1"]
    runs = {
        "default": [],
        "contiguous": ["--memory-format", "contiguous"],
        "channels_last": ["--memory-format", "channels_last"],
        "ddim": ["--eta", "0"],
        "fixed_small": ["--variance-type", "fixed_small"],
        "ddim-clipped": ["--eta", "0", "--clip-sample"],
    }
    threads = torch.get_num_threads()
    try:
        for name, options in runs.items():
            assert main([*flags, *options, "--out", str(tmp_path / name)]) == 0
    finally:  # --threads sets them for the whole process: give the other tests theirs back
        torch.set_num_threads(threads)

    def images(name):
        return np.stack([pixels(tmp_path / name / f"{index:05d}.png") for index in range(3)])

    # The layout changes nothing but rounding; the scheduler options change the sampler.
    assert np.abs(images("default") - images("contiguous")).max() <= 1
    assert np.array_equal(images("default"), images("channels_last"))  # "auto" is channels_last on a CPU
    assert np.abs(images("default") - images("ddim")).mean() > 5
    assert not np.array_equal(images("default"), images("fixed_small"))
    assert not np.array_equal(images("ddim"), images("ddim-clipped"))


def test_compile_option_compiles_the_unet_in_the_mode_for_its_device(gray_pipeline, tmp_path, monkeypatch):
    gray_pipeline.save_pretrained(tmp_path / "model")
    modes = []

    def record_compile(module, mode):
        modes.append(mode)
        return module  # compiling for real takes a minute: what is checked here is what reaches torch.compile

    monkeypatch.setattr(torch, "compile", record_compile)
    flags = ["sample", str(tmp_path / "model"), "--num-images", "1", "--steps", "2", "--out", str(tmp_path / "out")]
    assert main([*flags, "--compile", "--device", "cpu"]) == 0
    assert modes == ["default"]  # CUDA graphs ("reduce-overhead") only on a GPU


def test_bad_model_gives_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'missing'} is neither a folder nor a Hub repo id (user/name): pass a folder written by "
        "save_pretrained or a repo id."
    ]
    assert not (tmp_path / "out").exists()


def test_installed_as_a_console_script():
    (script,) = [entry for entry in entry_points(group="console_scripts") if entry.name == "facediff"]
    assert script.value == "facediff.cli:main"


@pytest.fixture
def ten_step_model(tmp_path):
    """A saved pipeline trained for T=10 steps, so that --steps 20 is out of range."""
    torch.manual_seed(0)
    FaceDiffPipeline(
        unet=build_unet("small", 16, 1), scheduler=FaceDiffScheduler(num_train_timesteps=10)
    ).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_sample_checks_steps_before_creating_the_folder(ten_step_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sample", str(ten_step_model), "--steps", "20", "--num-images", "2", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [  # one line: no progress bar was started either
        "error: --steps 20 is more than the model's 10 training steps: pass --steps 10 or fewer, or leave it out for "
        "all of them."
    ]
    assert not out.exists()


def test_sample_refuses_a_folder_with_earlier_samples_unless_overwrite(gray_pipeline, tmp_path, capsys):
    gray_pipeline.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    flags = ["sample", str(tmp_path / "model"), "--steps", "2", "--out", str(out)]
    assert main([*flags, "--num-images", "3"]) == 0
    (out / "notes.txt").write_text("mine")
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in out.iterdir()}
    capsys.readouterr()

    assert main([*flags, "--num-images", "2", "--seed", "1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out {out} already holds samples (00000.png, 00001.png, ...): choose a new or empty --out, or pass "
        "--overwrite to replace them."
    ]
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in out.iterdir()} == before

    # --overwrite replaces the earlier run whole: no third image of it is left beside the new grid.
    assert main([*flags, "--num-images", "2", "--seed", "1", "--overwrite"]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["00000.png", "00001.png", "grid.png", "notes.txt"]
    assert (out / "00000.png").read_bytes() != before["00000.png"][0]  # seed 1, not the earlier seed 0


@pytest.mark.parametrize(
    "device, reason",
    [
        ("gpu", "is not a device torch knows (cpu, cuda, cuda:1, mps, ...)"),
        pytest.param(
            "cuda",
            "is not available on this machine",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
        ),
        pytest.param(
            "mps",
            "is not available on this machine",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here"),
        ),
    ],
)
def test_unusable_device_gives_one_line_before_anything_is_written(gray_pipeline, tmp_path, capsys, device, reason):
    gray_pipeline.save_pretrained(tmp_path / "model")
    fix = "pass --device cpu, or leave --device out to use cuda when available."
    sample = ["sample", str(tmp_path / "model"), "--num-images", "1", "--steps", "1", "--out", str(tmp_path / "out")]
    assert main([*sample, "--device", device]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: --device {device} {reason}") and line.endswith(fix)
    assert not (tmp_path / "out").exists()

    evaluate = ["eval", str(tmp_path / "model"), "--reference", str(tmp_path / "model"), "--no-inception"]
    assert main([*evaluate, "--device", device]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: --device {device} {reason}") and line.endswith(fix)
    assert not (tmp_path / "model" / "eval_results.json").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["sample", "model", "--steps", "abc"], "argument --steps: 'abc' is not an integer of at least 1"),
        (["sample", "model", "--batch-size", "0"], "argument --batch-size: '0' is not an integer of at least 1"),
        (
            ["eval", "model", "--reference", "faces", "--num-images", "1"],
            "argument --num-images: '1' is not an integer of at least 2",
        ),
    ],
)
def test_integer_options_are_refused_in_words(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"facediff {flags[0]}: error: {message}"
