"""The built-in training set: scikit-learn's bundled handwritten digits (1,797 images, 8x8, 16 gray levels), written
once as a PNG image folder so that they take the same `datasets` image-folder path as real data."""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from datasets import config as datasets_config
from PIL import Image

FOLDER_NAME = "facediff-sklearn-digits"


def digits_image_folder(root: str | os.PathLike | None = None) -> Path:
    """
    The digits as `<root>/<label>/<index>.png`, written on first use (atomically) and reused afterwards.

    Args:
        root (`str` or `os.PathLike`, *optional*):
            Where to write; default: `FOLDER_NAME` in the `datasets` cache.

    Returns:
        `Path`: the folder.
    """
    from sklearn.datasets import load_digits

    root = Path(root) if root is not None else Path(datasets_config.HF_DATASETS_CACHE) / FOLDER_NAME
    if root.is_dir():
        return root
    digits = load_digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        # load_digits gives 0..16 gray levels, ink high; scale to 0..255 and keep the ink white on black.
        pixels = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
        for index, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
            (staging / str(label)).mkdir(exist_ok=True)
            Image.fromarray(image, mode="L").save(staging / str(label) / f"{index:04d}.png")
        os.replace(staging, root)
    except OSError:
        if not root.is_dir():  # another process may have written it first; anything else is a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
