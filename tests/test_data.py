"""Image loading: every PIL mode converts correctly, channels follow the data, and bad data, flags and config files
are refused up front, before anything is written."""

import importlib.util
import logging
import re
import runpy
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from facediff import FaceDiffScheduler, build_unet, data
from facediff.training import train
from facediff.training_args import parse_training_arguments

from .conftest import FACES, TRAIN_SCRIPT, folder_state


def gray_gradient() -> Image.Image:
    return Image.fromarray(np.tile(np.arange(0, 240, 5, dtype=np.uint8), (32, 1)), mode="L")  # 48 wide, 32 high


def colour_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), mode="RGB")


def pixels(image, channels=1, resolution=16):
    return data.to_pixels(image, channels, resolution).astype(int)


def test_gray_modes_convert_to_the_same_pixels():
    gray = gray_gradient()
    expected = pixels(gray)
    assert expected.shape == (1, 16, 16)
    sixteen_bit = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    thirty_two_bit = sixteen_bit.convert("I")
    as_float = Image.fromarray(np.asarray(gray).astype(np.float32) / 255.0, mode="F")
    for image in (gray.convert("LA"), sixteen_bit, thirty_two_bit, as_float, gray.convert("RGB")):
        assert np.abs(pixels(image) - expected).max() <= 1, image.mode


def test_colour_modes_convert_to_the_same_pixels():
    colour = colour_image()
    expected = pixels(colour, 3)
    assert expected.shape == (3, 16, 16)
    palette = colour.quantize(colors=256)
    for image, tolerance in ((colour.convert("RGBA"), 0), (colour.convert("CMYK"), 0), (palette, None)):
        reference = expected if tolerance is not None else pixels(palette.convert("RGB"), 3)
        assert np.abs(pixels(image, 3) - reference).max() <= (tolerance or 0), image.mode


def test_transparency_is_white_and_colour_to_gray_is_luma():
    clear = Image.new("RGBA", (16, 16), (10, 200, 30, 0))
    assert (pixels(clear, 3) == 255).all() and (pixels(clear.convert("LA"), 1) == 255).all()
    colour = colour_image()
    assert np.abs(pixels(colour, 1) - pixels(colour.convert("L"), 1)).max() <= 1
    assert set(np.unique(pixels(Image.new("1", (16, 16), 1)))) == {255}


def test_center_and_offset_crops_take_the_right_window():
    wide = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (16, 1)), mode="L")  # 64 wide, 16 high
    left, centre, right = (data.to_pixels(wide, 1, 16, offset) for offset in (0.0, None, 1.0))
    assert left[0, 0, 0] < centre[0, 0, 0] < right[0, 0, 0]
    assert abs(int(centre[0, 0, 8]) - 128) <= 8


def write_images(folder: Path, images: dict[str, Image.Image]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(folder / name)
    return folder


def channels_of(folder: Path) -> int:
    args = parse_training_arguments(["--train_data_dir", str(folder)])
    raw, column = data.load_raw_dataset(args.image_source())
    return data.detect_channels(raw, column)


def test_channels_follow_the_data(tmp_path):
    gray_folder = write_images(tmp_path / "gray", {"a.png": gray_gradient(), "b.png": gray_gradient().convert("LA")})
    assert channels_of(gray_folder) == 1
    gray_palette = gray_gradient().convert("RGB").quantize(colors=16)
    assert channels_of(write_images(tmp_path / "palette", {"p.png": gray_palette})) == 1
    write_images(gray_folder / "nested", {"c.jpg": colour_image()})
    assert channels_of(gray_folder) == 3


def test_saved_dataset_and_image_column_are_used(tmp_path):
    faces = [Image.open(path).copy() for path in sorted(FACES.glob("*.png"))[:12]]
    dataset = datasets.Dataset.from_dict({"caption": ["a face"] * 12, "face": faces}).cast_column(
        "face", datasets.Image()
    )
    dataset.save_to_disk(tmp_path / "saved")
    args = parse_training_arguments(["--dataset_name", str(tmp_path / "saved"), "--resolution", "16"])
    raw, column = data.load_raw_dataset(args.image_source())
    assert column == "face" and len(raw) == 12
    processed = data.preprocess_images(raw, column, args.image_source(), 1)
    assert processed[0][data.PIXELS].shape == (1, 16, 16)


def train_flags(tmp_path, *flags):
    return ["--output_dir", str(tmp_path / "out"), "--resolution", "16", "--train_batch_size", "4",
            "--max_train_steps", "1", "--eval_batch_size", "1", "--num_inference_steps", "1", *flags]  # fmt: skip


def truncated_jpeg(path: Path):
    colour_image().save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:300])


def test_unreadable_images_are_skipped_with_a_counted_warning(tmp_path, caplog):
    folder = write_images(tmp_path / "faces", {f"{index}.png": gray_gradient() for index in range(6)})
    truncated_jpeg(folder / "broken.jpg")
    (folder / "not-an-image.png").write_bytes(b"hello")
    with caplog.at_level(logging.WARNING):
        train(parse_training_arguments(train_flags(tmp_path, "--train_data_dir", str(folder))))
    warning = next(record.message for record in caplog.records if "Skipping" in record.message)
    assert "Skipping 2 of 8 images" in warning and "broken.jpg" in warning and "not-an-image.png" in warning
    assert (tmp_path / "out" / "model_index.json").exists()


def colour_dataset_without_images(tmp_path) -> Path:
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(tmp_path / "text")
    return tmp_path / "text"


def only_text_files(tmp_path) -> Path:
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    return folder


def only_broken_images(tmp_path) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir()
    truncated_jpeg(folder / "a.jpg")
    (folder / "b.png").write_bytes(b"\x89PNG but not really")
    return folder


def file_not_folder(tmp_path) -> Path:
    (tmp_path / "faces.zip").write_bytes(b"PK")
    return tmp_path / "faces.zip"


def empty_folder(tmp_path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def rgb_unet_config(tmp_path) -> Path:
    build_unet("small", 16, 3).save_config(tmp_path / "rgb-unet")
    return tmp_path / "rgb-unet"


def gray_unet_config(tmp_path) -> Path:
    build_unet("small", 16, 1).save_config(tmp_path / "gray-unet")  # 3 down blocks: downsamples by 4
    return tmp_path / "gray-unet"


def scheduler_config(tmp_path) -> Path:
    FaceDiffScheduler().save_config(tmp_path / "scheduler")
    return tmp_path / "scheduler" / "scheduler_config.json"


def faces_with_labels(tmp_path) -> Path:
    faces = [Image.open(path).copy() for path in sorted(FACES.glob("*.png"))[:4]]
    dataset = datasets.Dataset.from_dict({"label": [0, 1, 2, 3], "face": faces}).cast_column("face", datasets.Image())
    dataset.save_to_disk(tmp_path / "labelled")
    return tmp_path / "labelled"


def checkpoint_without_state(tmp_path) -> Path:
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "model.safetensors").write_bytes(b"half a checkpoint")
    return tmp_path / "checkpoint-3"


BAD_INPUTS = [
    (lambda tmp: ["--train_data_dir", str(tmp / "missing")], r"--train_data_dir .*missing does not exist"),
    (lambda tmp: ["--train_data_dir", str(file_not_folder(tmp))], r"is a file, not a folder"),
    (lambda tmp: ["--train_data_dir", str(empty_folder(tmp))], r"is empty: put images in it"),
    (lambda tmp: ["--train_data_dir", str(only_text_files(tmp))], r"holds no images \(searched recursively"),
    (lambda tmp: ["--train_data_dir", str(only_broken_images(tmp))], r"None of the 2 images could be read, e\.g\."),
    (lambda tmp: ["--dataset_name", str(colour_dataset_without_images(tmp))], r"has no Image column .*--image_column"),
    (
        lambda tmp: ["--train_data_dir", str(FACES), "--image_column", "photo"],
        r"--image_column 'photo' is not a column .* its columns are image",
    ),
    (
        lambda tmp: ["--train_data_dir", str(FACES), "--max_train_samples", "3"],
        r"Only 3 usable images for a batch of 4: lower --train_batch_size",
    ),
    (lambda tmp: ["--train_data_dir", str(FACES), "--resolution", "200"], r"resolution 200 is not divisible by 32"),
    (lambda tmp: ["--resolution", "8"], r"resolution must be between 16 and 256"),
    (lambda tmp: ["--train_data_dir", str(FACES), "--dataset_name", "x/y"], r"either --dataset_name or"),
    (lambda tmp: ["--num_channels", "2"], r"--num_channels must be 1 or 3"),
    (lambda tmp: ["--model_preset", "huge"], r"Unknown UNet preset 'huge'"),
    (lambda tmp: ["--num_inference_steps", "2000"], r"--num_inference_steps \(2000\) cannot exceed"),
    (lambda tmp: ["--train_batch_size", "0"], r"--train_batch_size must be at least 1"),
    (lambda tmp: ["--learning_rate", "-1"], r"--learning_rate must be positive"),
    (lambda tmp: ["--lr_scheduler", "cosin"], r"--lr_scheduler 'cosin' is not one of linear, cosine,"),
    # It needs step rules that no flag passes.
    (
        lambda tmp: ["--lr_scheduler", "piecewise_constant"],
        r"--lr_scheduler 'piecewise_constant' is not one of linear, cosine, .*constant_with_warmup, inverse_sqrt\.$",
    ),
    (
        lambda tmp: ["--lerning_rate", "1e-4"],
        r"Unknown argument\(s\) --lerning_rate 1e-4: `train_accelerate.py --help` lists the flags",
    ),
    (
        lambda tmp: ["--model_config_name_or_path", str(tmp / "unet.json")],
        r"unet.json is neither a config.json nor a folder holding one",
    ),
    (
        lambda tmp: ["--train_data_dir", str(FACES), "--model_config_name_or_path", str(rgb_unet_config(tmp))],
        r"rgb-unet takes 3 channel\(s\) but the data has 1: pass --num_channels 3",
    ),
    (
        lambda tmp: ["--model_config_name_or_path", str(gray_unet_config(tmp)), "--resolution", "15"],
        r"resolution 15 is not a multiple of 4, the downsampling of the UNet in --model_config_name_or_path "
        r".*gray-unet \(3 down blocks\): pass --resolution 12 or 16\.",
    ),
    (
        lambda tmp: ["--model_config_name_or_path", str(scheduler_config(tmp))],
        r"scheduler_config.json is a FaceDiffScheduler config, not a UNet2DModel config: .* a saved pipeline's unet/",
    ),
    (
        lambda tmp: ["--dataset_name", str(faces_with_labels(tmp)), "--image_column", "label"],
        r"--image_column 'label' of --dataset_name .*labelled holds int64 values, not images; its image columns are "
        r"face: pass one of them",
    ),
    (
        lambda tmp: ["--output_dir", str(file_not_folder(tmp) / "out")],
        r"Cannot write to --output_dir .*faces.zip is not a writable folder\): choose a writable folder",
    ),
    (
        lambda tmp: ["--resume_from_checkpoint", str(tmp / "checkpoint-9")],
        r"--resume_from_checkpoint .*checkpoint-9 does not exist: pass a checkpoint-<step> folder or 'latest'",
    ),
    (
        lambda tmp: ["--resume_from_checkpoint", str(checkpoint_without_state(tmp))],
        r"checkpoint-3 is not a complete facediff checkpoint \(no facediff_state.json\)",
    ),
]


@pytest.mark.parametrize("make_flags,message", BAD_INPUTS)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, make_flags, message):
    flags = make_flags(tmp_path)
    before = folder_state(tmp_path)
    with pytest.raises(ValueError, match=message):
        train(parse_training_arguments(train_flags(tmp_path, *flags)))
    assert folder_state(tmp_path) == before  # not even --output_dir was created


BAD_CONFIG_FILES = [
    ("run.yaml", "output_dir: OUT\nlearning_rate: [1e-4\n", r"run.yaml is not valid YAML \(.*line 2.*\): fix the file"),
    ("run.json", '{"output_dir": "OUT",}', r"run.json is not valid JSON \(Expecting property name .*\): fix the file"),
    ("run.yaml", "output_dir: OUT\nlerning_rate: 1e-4\n", r"run.yaml: unknown setting\(s\) lerning_rate: .* --help"),
    ("run.yaml", "- output_dir\n- OUT\n", r"run.yaml must map setting names to values"),
]


@pytest.mark.parametrize("name,text,message", BAD_CONFIG_FILES)
def test_bad_config_files_are_refused_before_anything_is_written(tmp_path, name, text, message):
    (tmp_path / name).write_text(text.replace("OUT", str(tmp_path / "out")))
    before = folder_state(tmp_path)
    with pytest.raises(ValueError, match=message):
        train(parse_training_arguments([str(tmp_path / name)]))
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize(
    "setting,complaint",
    [
        ("prediction_type: x0", r"argument --prediction_type.*: invalid choice: 'x0' \(choose from 'epsilon'"),
        ("train_batch_size: eight", r"argument --train_batch_size.*: invalid int value: 'eight'"),
    ],
)
def test_config_file_values_are_checked_as_flags_are(tmp_path, capsys, setting, complaint):
    (tmp_path / "run.yaml").write_text(f"output_dir: {tmp_path / 'out'}\n{setting}\n")
    before = folder_state(tmp_path)
    with pytest.raises(SystemExit) as exited:
        parse_training_arguments([str(tmp_path / "run.yaml")])
    assert exited.value.code == 2 and re.search(complaint, capsys.readouterr().err)
    assert folder_state(tmp_path) == before


def test_the_command_line_prints_one_line_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    # The script as `python train_accelerate.py ...` runs it, in this process.
    argv = [str(TRAIN_SCRIPT), "--train_data_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().splitlines()[-1].startswith("error: --train_data_dir")
    assert "Traceback" not in stderr
    assert not list(tmp_path.iterdir())


def test_a_dataset_folder_that_load_dataset_reads_is_used(tmp_path):
    # A local clone of a Hub dataset repo: parquet files, not a save_to_disk folder.
    faces = [Image.open(path).copy() for path in sorted(FACES.glob("*.png"))[:12]]
    dataset = datasets.Dataset.from_dict({"face": faces}).cast_column("face", datasets.Image())
    dataset.to_parquet(tmp_path / "faces-repo" / "data" / "train-00000-of-00001.parquet")
    args = parse_training_arguments(["--dataset_name", str(tmp_path / "faces-repo"), "--resolution", "16"])
    raw, column = data.load_raw_dataset(args.image_source())
    assert column == "face" and len(raw) == 12
    assert data.preprocess_images(raw, column, args.image_source(), 1)[0][data.PIXELS].shape == (1, 16, 16)


def test_image_column_takes_images_or_image_paths_only(tmp_path):
    paths = [str(path) for path in sorted(FACES.glob("*.png"))[:4]]
    datasets.Dataset.from_dict({"file": paths, "label": [0, 1, 2, 3]}).save_to_disk(tmp_path / "paths")
    args = parse_training_arguments(["--dataset_name", str(tmp_path / "paths"), "--image_column", "file"])
    raw, column = data.load_raw_dataset(args.image_source())
    assert column == "file" and data.detect_channels(raw, column) == 1
    args = parse_training_arguments(["--dataset_name", str(tmp_path / "paths"), "--image_column", "label"])
    with pytest.raises(ValueError, match=r"'label' of .* holds int64 values, not images; it has no image column"):
        data.load_raw_dataset(args.image_source())


def test_cache_dir_holds_the_builtin_digits(tmp_path):
    args = parse_training_arguments(["--cache_dir", str(tmp_path / "cache"), "--max_train_samples", "4"])
    raw, column = data.load_raw_dataset(args.image_source())
    assert len(raw) == 4
    assert len(list((tmp_path / "cache" / "facediff-sklearn-digits").rglob("*.png"))) == 1797


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_logger_that_is_not_installed_is_refused_before_anything_is_written(tmp_path):
    before = folder_state(tmp_path)
    with pytest.raises(ValueError, match=r"^--logger wandb needs the wandb package, which is not installed: pip ins"):
        train(parse_training_arguments(train_flags(tmp_path, "--logger", "wandb")))
    assert folder_state(tmp_path) == before
