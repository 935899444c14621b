import os

# The Hub is unreachable from the test machines: everything must come from local folders or the Hub cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Decoded datasets and the built-in digits are cached per test session, not in the user's cache.
SESSION_DATASETS_CACHE = None
if "HF_DATASETS_CACHE" not in os.environ:
    SESSION_DATASETS_CACHE = __import__("tempfile").mkdtemp(prefix="facediff-datasets-")
    os.environ["HF_DATASETS_CACHE"] = SESSION_DATASETS_CACHE

import hashlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import facediff.precision  # noqa: E402
import facediff.training  # noqa: E402
from facediff import FaceDiffPipeline, FaceDiffScheduler  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(TEST_DATA, ignore_errors=True)
    if SESSION_DATASETS_CACHE is not None:
        shutil.rmtree(SESSION_DATASETS_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process training run starts Accelerate afresh, as a new process would."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def float32_by_default(monkeypatch):
    """`--dtype auto` picks float32 in every test, whatever this machine's CPU computes natively, so that images
    compare alike on every machine; tests of the choice itself set the answer they need."""
    monkeypatch.setattr(facediff.precision, "CPU_BF16_CHECKS", ())


@pytest.fixture(autouse=True)
def isolated_module_cache(tmp_path_factory, monkeypatch):
    """Remote code is copied into HF_MODULES_CACHE; keep each test's copy out of the user's cache."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))


TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TRAIN_SCRIPT = REPO / "train_accelerate.py"


def make_faces(folder: Path, count: int, size: int, mode: str, suffix: str) -> Path:
    """`count` face-like images drawn here, each different: a lit oval on a darker ground, two eyes and a mouth,
    with position, size and shade drawn from a seeded generator (gray PNGs like Olivetti's, RGB JPEGs like
    UTKFace's crops), so that tests need no data set from outside the repository."""
    rng = np.random.default_rng([count, size, len(mode)])
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        ground = tuple(int(v) for v in rng.integers(10, 90, 3))
        skin = tuple(int(v) for v in rng.integers(120, 250, 3))
        image = Image.new("RGB", (size, size), ground)
        draw = ImageDraw.Draw(image)
        cx, cy = (size / 2 + rng.uniform(-0.08, 0.08, 2) * size).tolist()
        rx, ry = (rng.uniform(0.25, 0.35) * size, rng.uniform(0.33, 0.43) * size)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=skin)
        eye = max(1.0, 0.06 * size)
        for side in (-1, 1):
            ex, ey = cx + side * 0.4 * rx, cy - 0.25 * ry
            draw.ellipse((ex - eye, ey - eye, ex + eye, ey + eye), fill=(20, 20, 20))
        draw.line(
            (cx - 0.4 * rx, cy + 0.5 * ry, cx + 0.4 * rx, cy + 0.5 * ry), fill=(90, 30, 30), width=max(1, size // 32)
        )
        image.convert(mode).save(folder / f"{index:03d}{suffix}")
    return folder


# Made once per test session, removed at its end: 40 gray 64x64 PNG faces and 24 RGB 200x200 JPEG faces.
TEST_DATA = Path(tempfile.mkdtemp(prefix="facediff-test-data-"))
FACES = make_faces(TEST_DATA / "faces" / "train", 40, 64, "L", ".png")
RGB_FACES = make_faces(TEST_DATA / "rgb-faces" / "train", 24, 200, "RGB", ".jpg")


def tiny_unet_config(channels: int, resolution: int = 16) -> dict:
    """A UNet2DModel of two levels, 8 and 16 channels, with attention at the lower one: it trains and samples in
    milliseconds, and takes every code path the presets do."""
    return {
        "sample_size": resolution,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": None,
        "norm_num_groups": 4,
    }


def one_level_unet() -> UNet2DModel:
    """The smallest UNet2DModel: one level of 4 channels, 8x8 gray, for tests that run the 1000-step chain, where
    any UNet shows what they check and each call's cost adds up."""
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(4,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        layers_per_block=1,
        norm_num_groups=2,
        add_attention=False,
    )


def tiny_unet(channels: int, resolution: int = 16) -> UNet2DModel:
    return UNet2DModel(**tiny_unet_config(channels, resolution))


def tiny_unet_folder(channels: int, folder: Path) -> Path:
    """The tiny UNet's config.json in `folder`, for training runs (--model_config_name_or_path)."""
    tiny_unet(channels).save_config(folder)
    return folder


TINY_GRAY_UNET = tiny_unet_folder(1, TEST_DATA / "tiny-unet-gray")
TINY_RGB_UNET = tiny_unet_folder(3, TEST_DATA / "tiny-unet-rgb")


def tiny_run(output_dir, *flags) -> list[str]:
    """The flags of a training run that takes a second: the tiny gray UNet at 16x16, 4 steps of 8 images, a
    checkpoint and a sample grid every 2 steps, in float32 on every machine (also in the subprocesses that the pin
    of `auto` above cannot reach). Flags given after these override them."""
    return [
        "--output_dir", str(output_dir),
        "--model_config_name_or_path", str(TINY_GRAY_UNET),
        "--resolution", "16",
        "--train_batch_size", "8",
        "--max_train_steps", "4",
        "--checkpointing_steps", "2",
        "--save_images_steps", "2",
        "--eval_batch_size", "4",
        "--num_inference_steps", "3",
        "--lr_warmup_steps", "1",
        "--mixed_precision", "no",
        *flags,
    ]  # fmt: skip


def folder_state(folder) -> dict:
    """Every entry under `folder` with its modification time, and each file's bytes: equal before and after means
    nothing was written, overwritten, created or deleted there."""
    return {
        str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.read_bytes() if path.is_file() else None)
        for path in [folder, *folder.rglob("*")]
    }


@pytest.fixture
def gray_pipeline():
    torch.manual_seed(0)
    return FaceDiffPipeline(unet=tiny_unet(1), scheduler=FaceDiffScheduler())


@pytest.fixture
def rgb_pipeline():
    torch.manual_seed(1)
    return FaceDiffPipeline(unet=tiny_unet(3), scheduler=FaceDiffScheduler())


def lay_out_as_hub_cache(
    folder: Path, cache_dir: Path, repo_id: str, revision: str = "0123456789abcdef" * 2 + "01234567"
) -> Path:
    """Copy `folder` into `cache_dir` the way huggingface_hub stores a downloaded repo: blobs named by content hash,
    a snapshot of symlinks per revision, and refs/main naming the revision."""
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.rglob("*")):
        if path.is_dir() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        blob = repo_dir / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def inf_gradients_for(num_steps: int):
    """Model builder whose conv_in gradient is infinite in the first `num_steps` backward passes."""
    build_model = facediff.training._build_model
    backward_passes = []

    def build(args, channels):
        unet = build_model(args, channels)

        def poison(grad):
            backward_passes.append(1)
            return grad * float("inf") if len(backward_passes) <= num_steps else grad

        unet.conv_in.weight.register_hook(poison)
        return unet

    return build


UNPATCHED_LOSS = facediff.training._diffusion_loss


def record_batches(monkeypatch) -> list[str]:
    """Hash each batch the loss sees, in order."""
    seen = []
    original = UNPATCHED_LOSS

    def recording(unet, scheduler, pixels, args):
        seen.append(hashlib.sha256(pixels.numpy().tobytes()).hexdigest())
        return original(unet, scheduler, pixels, args)

    monkeypatch.setattr(facediff.training, "_diffusion_loss", recording)
    return seen
