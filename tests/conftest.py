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
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from facediff import FaceDiffPipeline, FaceDiffScheduler, build_unet  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if SESSION_DATASETS_CACHE is not None:
        shutil.rmtree(SESSION_DATASETS_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_module_cache(tmp_path_factory, monkeypatch):
    """Remote code is copied into HF_MODULES_CACHE; keep each test's copy out of the user's cache."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))


SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
OLIVETTI = SHARED_DATASETS / "olivetti-faces" / "train"
UTKFACE = SHARED_DATASETS / "utkface-crop" / "train"


@pytest.fixture
def gray_pipeline():
    torch.manual_seed(0)
    return FaceDiffPipeline(unet=build_unet("small", 16, 1), scheduler=FaceDiffScheduler())


@pytest.fixture
def rgb_pipeline():
    torch.manual_seed(1)
    return FaceDiffPipeline(unet=build_unet("small", 16, 3), scheduler=FaceDiffScheduler())


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
