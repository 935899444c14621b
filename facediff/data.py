"""Training and reference images: from an image folder, a Hub or saved dataset, or the built-in digits, to uint8
arrays.

Decoding and resizing happen once, in `datasets.Dataset.map` (several processes, cached on disk by `datasets`), so
an epoch afterwards reads small arrays and the data path never holds the training step back. Bad files are found
in that same pass and reported before training starts.

This layer knows no command line: an `ImageSource` says what to read, and an `ImageSourceError` names the setting at
fault and its value, which the training script and the CLI turn into their own flag names.
"""

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageOps

from .locations import is_saved_dataset

logger = logging.getLogger(__name__)

GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
HIGH_BIT_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
IMAGE_EXTENSIONS = {ext.lower() for ext in datasets.packaged_modules.imagefolder.ImageFolder.EXTENSIONS}
PIXELS = "pixel_values"


@dataclass(frozen=True)
class ImageSource:
    """
    Where images come from and how they are read.

    Args:
        location (`str`, *optional*):
            A folder of images (read recursively), a `save_to_disk` folder, a Hub dataset id or a folder that
            `datasets.load_dataset` reads; `None`: scikit-learn's bundled handwritten digits.
        is_image_folder (`bool`, defaults to `False`):
            Read `location` as a folder of image files, whatever else it holds.
        image_column (`str`, *optional*):
            The column of images or image file paths; default: the first Image feature.
        resolution (`int`, defaults to 64):
            The side of the square images produced.
        center_crop (`bool`, defaults to `False`):
            Crop the longer side's middle; otherwise at a random place, drawn once per image from `seed`.
        cache_dir (`str`, *optional*):
            Where `datasets` caches downloads and the preprocessed images (and where the digits are written).
        limit (`int`, *optional*):
            Keep this many images, a seeded random subset.
        seed (`int`, defaults to 0):
            Draws that subset and the crops.
        num_workers (`int`, *optional*):
            Processes that decode; default: see `preprocessing_processes`.
        config_name (`str`, *optional*):
            The configuration of a dataset that has several (`datasets.load_dataset`'s `name`).
        preserve_precision (`bool`, defaults to `False`):
            Keep 16- and 32-bit grayscale levels: pixels are float32 on the 0-255 scale instead of uint8.
    """

    location: str | None = None
    is_image_folder: bool = False
    image_column: str | None = None
    resolution: int = 64
    center_crop: bool = False
    cache_dir: str | None = None
    limit: int | None = None
    seed: int = 0
    num_workers: int | None = None
    config_name: str | None = None
    preserve_precision: bool = False

    def describe(self) -> str:
        """The source as an `ImageSourceError` names it."""
        return "{location} " + self.location if self.location is not None else "the built-in digits dataset"


class ImageSourceError(ValueError):
    """
    Bad data, or a setting of an `ImageSource` that cannot be read. The message refers to the settings as
    `{location}` and `{image_column}`, which `naming` replaces with a front end's own names for them (its flags);
    `str(error)` reads "the location ..." and "image_column ...".

    Args:
        template (`str`):
            The message, with the settings' placeholders.
    """

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.naming())

    def naming(self, location: str = "the location", image_column: str = "image_column") -> str:
        """
        The message with each setting called by the given name.

        Args:
            location (`str`):
                What sets `ImageSource.location`, e.g. `"--train_data_dir"`.
            image_column (`str`):
                What sets `ImageSource.image_column`, e.g. `"--image_column"`.

        Returns:
            `str`
        """
        return self.template.replace("{location}", location).replace("{image_column}", image_column)


def load_raw_dataset(source: ImageSource) -> tuple[datasets.Dataset, str]:
    """
    The train split of `source` with its image column left undecoded, and that column's name.

    Args:
        source (`ImageSource`):
            What to read.

    Returns:
        `tuple[datasets.Dataset, str]`

    Raises:
        `ImageSourceError`: when there is nothing to read, or no image column.
    """
    location = source.location
    if location is not None and source.is_image_folder:
        dataset = datasets.load_dataset(
            "imagefolder", data_dir=_checked_image_folder(location), cache_dir=source.cache_dir
        )
    elif location is not None and is_saved_dataset(location):
        dataset = datasets.load_from_disk(location)
    elif location is not None:  # a Hub id, or a folder load_dataset reads (a clone of a Hub dataset repo)
        dataset = datasets.load_dataset(location, source.config_name, cache_dir=source.cache_dir)
    else:
        from .digits import FOLDER_NAME, digits_image_folder

        folder = digits_image_folder(Path(source.cache_dir) / FOLDER_NAME if source.cache_dir is not None else None)
        dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=source.cache_dir)

    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ImageSourceError(
                f"{source.describe()} has no 'train' split (it has {', '.join(dataset)}): save or pass one."
            )
        dataset = dataset["train"]
    image_column = _image_column(dataset, source)
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if len(dataset) == 0:
        raise ImageSourceError(f"{source.describe()} holds no images: pass a dataset with a train split of images.")
    if source.limit is not None and source.limit < len(dataset):
        dataset = dataset.shuffle(seed=source.seed).select(range(source.limit))
    return dataset, image_column


def detect_channels(dataset: datasets.Dataset, image_column: str) -> int:
    """1 when every image is grayscale, else 3: read from the file headers (palette images are decoded to check)."""
    for item in dataset[image_column]:
        try:
            with _open(item) as image:
                if image.mode not in GRAY_MODES and not _is_gray_palette(image):
                    return 3
        except Exception:  # unreadable files are reported by preprocess_images, with their names
            continue
    return 1


def preprocess_images(
    dataset: datasets.Dataset,
    image_column: str,
    source: ImageSource,
    channels: int,
) -> datasets.Dataset:
    """
    Decode, convert, resize and crop every image once; drop unreadable ones with a warning that counts them.

    Args:
        dataset (`datasets.Dataset`):
            From `load_raw_dataset`.
        image_column (`str`):
            The undecoded image column.
        source (`ImageSource`):
            `resolution`, `center_crop`, `seed` and `num_workers`.
        channels (`int`):
            1 or 3.

    Returns:
        `datasets.Dataset`: one column, `pixel_values`, of shape (channels, resolution, resolution): uint8, or
        float32 on the same 0-255 scale with `source.preserve_precision`.

    Raises:
        `ImageSourceError`: when no image can be read.
    """
    resolution = source.resolution
    dtype = "float32" if source.preserve_precision else "uint8"
    features = datasets.Features(
        {
            PIXELS: datasets.Array3D(shape=(channels, resolution, resolution), dtype=dtype),
            "error": datasets.Value("string"),
        }
    )
    processed = dataset.map(
        _preprocess_batch,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=features,
        num_proc=preprocessing_processes(source, len(dataset)),
        fn_kwargs={
            "image_column": image_column,
            "channels": channels,
            "resolution": resolution,
            "center_crop": source.center_crop,
            "seed": source.seed,
            "precise": source.preserve_precision,
        },
        desc="Decoding and resizing images",
    )
    errors = [error for error in processed["error"] if error]
    if len(errors) == len(processed):
        raise ImageSourceError(f"None of the {len(errors)} images could be read, e.g. {errors[0]}.")
    if errors:
        shown = "; ".join(errors[:5]) + ("; ..." if len(errors) > 5 else "")
        logger.warning("Skipping %d of %d images that could not be read: %s", len(errors), len(processed), shown)
        processed = processed.filter(lambda error: not error, input_columns="error")
    return processed.remove_columns("error").with_format("torch")


def preprocessing_processes(source: ImageSource, num_images: int) -> int | None:
    """
    The processes `preprocess_images` decodes in: `source.num_workers`, else up to 4 (one per core), and none of
    its own (`None`) below 1,000 images, where starting them costs more than they save.

    Args:
        source (`ImageSource`):
            What is read.
        num_images (`int`):
            The dataset's size.

    Returns:
        `int` or `None`: `datasets.Dataset.map`'s `num_proc`.
    """
    if num_images < 1000:
        return None
    return source.num_workers or min(4, os.cpu_count() or 1)


def to_pixels(
    image: Image.Image, channels: int, resolution: int, crop_offset: float | None = None, precise: bool = False
) -> np.ndarray:
    """
    One image as a uint8 array of shape (channels, resolution, resolution), or float32 with `precise`.

    Every PIL mode converts: 16- and 32-bit grayscale are scaled (not clipped) to 8 bits, transparency is composited
    onto white, palette and CMYK images go through RGB; RGB becomes gray by ITU-R 601 luma. The shorter side is
    cropped to a square, then resized to `resolution`: centred, or at `crop_offset` (0 to 1) along it.

    Args:
        image (`PIL.Image.Image`):
            The decoded image.
        channels (`int`):
            1 or 3.
        resolution (`int`):
            Output side.
        crop_offset (`float`, *optional*):
            Where the crop window starts along the longer side, as a fraction of the slack; `None` centres it.
        precise (`bool`, defaults to `False`):
            float32 on the 0-255 scale; 16- and 32-bit grayscale keep their levels between the 256 of 8 bits (scaled
            as above, resized in float, repeated into 3 channels for RGB), other modes give the uint8 values.

    Returns:
        `np.ndarray`
    """
    centering = (0.5, 0.5) if crop_offset is None else (crop_offset, crop_offset)
    if precise and image.mode in HIGH_BIT_GRAY_MODES:
        image = ImageOps.fit(_to_float(image), (resolution, resolution), Image.Resampling.BICUBIC, centering=centering)
        array = np.clip(np.asarray(image, dtype=np.float32), 0.0, 255.0)[None]
        return array if channels == 1 else np.repeat(array, 3, axis=0)
    image = _to_mode(image, "L" if channels == 1 else "RGB")
    image = ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC, centering=centering)
    array = np.asarray(image, dtype=np.uint8)
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return array.astype(np.float32) if precise else array


def _preprocess_batch(batch, indices, image_column, channels, resolution, center_crop, seed, precise):
    pixels, errors = [], []
    for item, index in zip(batch[image_column], indices, strict=True):
        try:
            with _open(item) as image:
                if image.format == "JPEG":
                    image.draft(image.mode, (resolution, resolution))  # decode at a reduced scale: much faster
                image.load()
                crop_offset = None if center_crop else float(np.random.default_rng([seed, index]).random())
                pixels.append(to_pixels(image, channels, resolution, crop_offset, precise))
                errors.append("")
        except Exception as error:
            pixels.append(np.zeros((channels, resolution, resolution), dtype=np.float32 if precise else np.uint8))
            errors.append(f"{item.get('path') or f'image {index}'} ({type(error).__name__}: {error})")
    return {PIXELS: pixels, "error": errors}


def _gray_levels(image: Image.Image) -> np.ndarray:
    """A 16- or 32-bit grayscale image's values on the 0-255 scale: F images in [0, 1], and integer images whose
    values fit 8 bits, are taken as such; other integer images as 16-bit."""
    values = np.asarray(image, dtype=np.float64)
    top = 1.0 if image.mode == "F" and values.max() <= 1.0 else (255.0 if values.max() <= 255 else 65535.0)
    return values / top * 255.0


def _to_float(image: Image.Image) -> Image.Image:
    return Image.fromarray(_gray_levels(image).astype(np.float32), mode="F")


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode in HIGH_BIT_GRAY_MODES:
        image = Image.fromarray(np.clip(_gray_levels(image) + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("LA", "RGBA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode != mode:
        image = image.convert(mode)
    return image


def _is_gray_palette(image: Image.Image) -> bool:
    if image.mode != "P":
        return False
    colours = np.asarray(image.convert("RGB")).reshape(-1, 3)
    return bool((colours == colours[:, :1]).all())


def _open(item: dict) -> Image.Image:
    if item.get("bytes"):
        return Image.open(io.BytesIO(item["bytes"]))
    return Image.open(item["path"])


def _image_column(dataset: datasets.Dataset, source: ImageSource) -> str:
    image_columns = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    column = source.image_column
    if column is not None:
        if column not in dataset.column_names:
            raise ImageSourceError(
                f"{{image_column}} {column!r} is not a column of {source.describe()}; "
                f"its columns are {', '.join(dataset.column_names)}."
            )
        feature = dataset.features[column]
        # Images, or strings that cast_column reads as image file paths; anything else cannot become an image.
        is_paths = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
        if not isinstance(feature, datasets.Image) and not is_paths:
            found = f"its image columns are {', '.join(image_columns)}" if image_columns else "it has no image column"
            raise ImageSourceError(
                f"{{image_column}} {column!r} of {source.describe()} holds {_describe(feature)}, not images; "
                f"{found}: pass one of them (or a column of image file paths)."
            )
        return column
    if not image_columns:
        raise ImageSourceError(
            f"{source.describe()} has no Image column (columns: {', '.join(dataset.column_names)}): "
            "name the one holding images with {image_column}."
        )
    return image_columns[0]


def _describe(feature) -> str:
    if isinstance(feature, datasets.Value):
        return f"{feature.dtype} values"
    if isinstance(feature, datasets.ClassLabel):
        return "class labels"
    return f"{type(feature).__name__} values"


def _checked_image_folder(folder: str) -> str:
    path = Path(folder)
    if not path.exists():
        raise ImageSourceError(f"{{location}} {folder} does not exist: pass a folder of images.")
    if not path.is_dir():
        raise ImageSourceError(f"{{location}} {folder} is a file, not a folder: pass the folder that holds the images.")
    if not any(entry.is_file() for entry in path.rglob("*")):
        raise ImageSourceError(f"{{location}} {folder} is empty: put images in it (subfolders are searched too).")
    if not any(entry.suffix.lower() in IMAGE_EXTENSIONS for entry in path.rglob("*") if entry.is_file()):
        raise ImageSourceError(
            f"{{location}} {folder} holds no images (searched recursively for .png, .jpg, .jpeg, .webp, ...)."
        )
    return str(path)
