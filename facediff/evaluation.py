"""Sample quality against a reference set: FID and KID on the FID Inception, a Frechet distance and KID on pixel
statistics that need no download, a memorisation check, and the samples' high-frequency energy against the
reference's (grain or blur, which the pixel-PCA scores hardly see).

The Frechet distance and KID are computed by torchmetrics (`FrechetInceptionDistance`, `KernelInceptionDistance`)
from features extracted here once per set, so that the reference set is passed through a network once for every
metric and every row of an evaluation.
"""

import math
import os
import pickle
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from .data import PIXELS, ImageSource, ImageSourceError, load_raw_dataset, preprocess_images
from .errors import first_line
from .fid_inception import FIDInceptionV3
from .locations import is_saved_dataset, looks_like_hub_id

# pytorch-fid's name first; torch-fidelity and torchmetrics cache their conversion of the same TensorFlow weights
# under the second name (the same hash suffix, and the same layout: loading checks every tensor's name and shape).
INCEPTION_WEIGHTS_NAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_SHA256_PREFIX = "6726825d"
PCA_SIDE = 32
PCA_COMPONENTS = 64
MEMORISATION_PERCENTILE = 1.0
# Two uint8 images closer than half a grey level (in [0, 1] units) are the same image.
IDENTICAL_DISTANCE = 0.5 / 255
KID_SUBSETS = 100
KID_MAX_SUBSET_SIZE = 1000
# Working-set bounds for the pixel-space passes, whose float64 copies grow with the image size.
CHUNK_BYTES = 64 << 20
RESIZE_BATCH_SIZE = 64


def load_fid_inception(weights_path: str | os.PathLike | None = None) -> FIDInceptionV3:
    """
    The FID Inception with its standard weights.

    Args:
        weights_path (`str` or `os.PathLike`, *optional*):
            The weights file. Default: torch hub's checkpoint cache (`$TORCH_HOME/hub/checkpoints`) under either name
            in `INCEPTION_WEIGHTS_NAMES`, downloaded there from `INCEPTION_WEIGHTS_URL` when missing, unless
            `HF_HUB_OFFLINE=1`.

    Returns:
        `FIDInceptionV3`

    Raises:
        `FileNotFoundError`: with how to provide the file, when it is neither given, cached nor downloadable.
        `ValueError`: when the file does not hold the FID Inception's tensors.
    """
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    how_to_provide = (
        f"download {INCEPTION_WEIGHTS_URL} and pass its path or put it in {checkpoints}/ (torch hub's cache)"
    )
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"{weights_path} is not a file: {how_to_provide}")
    else:
        path = next((checkpoints / name for name in INCEPTION_WEIGHTS_NAMES if (checkpoints / name).is_file()), None)
        if path is None:
            path = _download_inception_weights(checkpoints / INCEPTION_WEIGHTS_NAMES[0])
        if path is None:
            raise FileNotFoundError(f"The FID Inception weights are not in {checkpoints}: {how_to_provide}")
    try:
        return FIDInceptionV3().load_fid_weights(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, KeyError, AttributeError, EOFError, pickle.UnpicklingError) as error:
        # first_line: some carry no message at all (an empty file's EOFError), and then the type says what went wrong.
        raise ValueError(f"{path} is not the FID Inception weights ({first_line(error)}): {how_to_provide}") from error


class PixelPCA(nn.Module):
    """
    Coordinates of images on the reference set's top principal components of pixel values: images as values in
    [0, 1], resized to `side`x`side`, centred on the reference mean and projected on the components. A feature space
    fitted from the reference set alone, so it needs no download.

    Args:
        mean (`torch.Tensor`):
            The reference set's mean, flattened (channels * side * side).
        components (`torch.Tensor`):
            Orthonormal rows, largest variance first.
        side (`int`):
            Images are resized to this side first.
    """

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, side: int):
        super().__init__()
        self.side = side
        self.num_features = components.shape[0]
        self.register_buffer("mean", mean)
        self.register_buffer("components", components)

    @classmethod
    def fit(cls, images: torch.Tensor, num_components: int = PCA_COMPONENTS, side: int = PCA_SIDE) -> "PixelPCA":
        """Fit on uint8 images (N, C, H, W); at most N - 1 components, as N images span no more."""
        pixels = _resized_pixels(images, side)
        mean = pixels.mean(dim=0)
        _, _, right_singular_vectors = torch.linalg.svd(pixels - mean, full_matrices=False)  # largest first
        return cls(mean, right_singular_vectors[: min(num_components, len(images) - 1)].contiguous(), side)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (_resized_pixels(images, self.side) - self.mean) @ self.components.T


@torch.inference_mode()
def extract_features(
    extractor: nn.Module, images: torch.Tensor, batch_size: int = 64, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """
    Run `extractor` over uint8 images (N, C, H, W) in batches.

    Returns:
        `torch.Tensor`: float64 features (N, D) on the CPU.
    """
    extractor = extractor.to(device)
    batches = [images[start : start + batch_size].to(device) for start in range(0, len(images), batch_size)]
    return torch.cat([extractor(batch).double().cpu() for batch in batches])


def frechet_distance(reference_features: torch.Tensor, sample_features: torch.Tensor) -> float:
    """
    The Frechet distance between Gaussians fitted to two feature sets, by torchmetrics: FID when the features are
    the FID Inception's.

    Args:
        reference_features (`torch.Tensor`):
            (N, D), N >= 2.
        sample_features (`torch.Tensor`):
            (M, D), M >= 2.

    Returns:
        `float`
    """
    metric = FrechetInceptionDistance(feature=_Precomputed(reference_features.shape[1]))
    metric.update(reference_features.double(), real=True)
    metric.update(sample_features.double(), real=False)
    return max(metric.compute().item(), 0.0)  # rounding can leave a distance of zero a hair below it


def kernel_distance(
    reference_features: torch.Tensor, sample_features: torch.Tensor, seed: int = 0
) -> tuple[float, float]:
    """
    KID by torchmetrics: the unbiased squared MMD with the cubic polynomial kernel, averaged over `KID_SUBSETS`
    random subsets of up to `KID_MAX_SUBSET_SIZE` features per set. Unbiased, unlike FID, so it can be compared
    between evaluations with few samples.

    Args:
        reference_features (`torch.Tensor`):
            (N, D), N >= 2.
        sample_features (`torch.Tensor`):
            (M, D), M >= 2.
        seed (`int`, defaults to 0):
            Draws the subsets.

    Returns:
        `tuple[float, float]`: the mean and standard deviation over the subsets.
    """
    subset_size = min(KID_MAX_SUBSET_SIZE, len(reference_features), len(sample_features))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_Precomputed(reference_features.shape[1]), subsets=KID_SUBSETS, subset_size=subset_size
        )
    metric.update(reference_features.double(), real=True)
    metric.update(sample_features.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return mean.item(), std.item()


def nearest_distances(
    queries: torch.Tensor, keys: torch.Tensor, skip_identical: bool = False, chunk_size: int | None = None
) -> torch.Tensor:
    """
    The L2 distance, in pixels scaled to [0, 1], from each uint8 query image to its nearest key image.

    Args:
        queries (`torch.Tensor`):
            uint8 (N, C, H, W).
        keys (`torch.Tensor`):
            uint8 (M, C, H, W), the same image size.
        skip_identical (`bool`, defaults to `False`):
            Leave out keys identical to the query (the query itself, when `keys` is `queries`); `inf` when no key
            is left.
        chunk_size (`int`, *optional*):
            Images per block of the distance matrix; default: as many as fit in `CHUNK_BYTES` of float64 pixels.

    Returns:
        `torch.Tensor`: float64 (N,).
    """
    chunk_size = chunk_size or max(1, CHUNK_BYTES // (queries[0].numel() * 8))
    nearest = torch.full((len(queries),), float("inf"), dtype=torch.float64)
    for start in range(0, len(queries), chunk_size):
        query = queries[start : start + chunk_size].flatten(1).double() / 255
        for key_start in range(0, len(keys), chunk_size):
            key = keys[key_start : key_start + chunk_size].flatten(1).double() / 255
            distances = torch.cdist(query, key)
            if skip_identical:
                distances[distances < IDENTICAL_DISTANCE] = float("inf")
            chunk = nearest[start : start + chunk_size]
            torch.minimum(chunk, distances.min(dim=1).values, out=chunk)
    return nearest


def high_frequency_energy(images: torch.Tensor) -> float:
    """
    The mean squared response of the 5-point Laplacian over the images' interior pixels, each channel on its own,
    in pixels scaled to [0, 1]: the energy of their finest detail, where sampling grain shows and blur removes it.

    Args:
        images (`torch.Tensor`):
            uint8 (N, C, H, W), H and W at least 3.

    Returns:
        `float`
    """
    laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    total, count = 0.0, 0
    for start in range(0, len(images), RESIZE_BATCH_SIZE):
        chunk = images[start : start + RESIZE_BATCH_SIZE].double() / 255
        response = F.conv2d(chunk.flatten(0, 1).unsqueeze(1), laplacian.view(1, 1, 3, 3))
        total += response.square().sum().item()
        count += response.numel()
    return total / count


def memorisation_threshold(reference: torch.Tensor, percentile: float = MEMORISATION_PERCENTILE) -> float:
    """
    How close a sample must be to a reference image to count as a copy: the `percentile`-th percentile of the
    distances from each reference image to its nearest other one. Identical pairs are left out, so duplicates in the
    reference set cannot pull the threshold to zero.

    Args:
        reference (`torch.Tensor`):
            uint8 (N, C, H, W), at least two distinct images.
        percentile (`float`, defaults to 1):
            In [0, 100].

    Returns:
        `float`: a distance, as `nearest_distances` measures it.
    """
    distances = nearest_distances(reference, reference, skip_identical=True)
    distances = distances[distances.isfinite()]
    if len(distances) == 0:
        raise ValueError("The memorisation check needs at least two distinct reference images.")
    return torch.quantile(distances, percentile / 100).item()


def load_reference(
    reference: str, resolution: int, channels: int, max_images: int | None = None, seed: int = 0
) -> torch.Tensor:
    """
    The reference images, read the way training reads its data (`facediff.data`) and center-cropped.

    Args:
        reference (`str`):
            A folder of images, a `save_to_disk` folder, or a Hub dataset id; its train split when it has splits.
        resolution (`int`):
            The model's image side.
        channels (`int`):
            The model's channels, 1 or 3.
        max_images (`int`, *optional*):
            Keep this many images, a seeded random subset.
        seed (`int`, defaults to 0):
            Draws that subset.

    Returns:
        `torch.Tensor`: uint8 (N, channels, resolution, resolution).

    Raises:
        `ImageSourceError`: when `reference` cannot be read as images.
    """
    if not Path(reference).exists() and not looks_like_hub_id(reference):
        raise ImageSourceError(
            f"{{location}} {reference} does not exist: pass a folder of images, a save_to_disk folder or a Hub "
            "dataset id."
        )
    source = ImageSource(
        location=reference,
        is_image_folder=Path(reference).exists() and not is_saved_dataset(reference),
        resolution=resolution,
        center_crop=True,
        limit=max_images,
        seed=seed,
    )
    dataset, image_column = load_raw_dataset(source)
    return preprocess_images(dataset, image_column, source, channels)[:][PIXELS].to(torch.uint8)


class SampleEvaluator:
    """
    Scores sets of samples against one reference set, whose features are computed once.

    Args:
        reference (`torch.Tensor`):
            uint8 (N, C, H, W), N >= 2: the training images, for the memorisation check to mean memorisation.
        inception (`torch.nn.Module`, *optional*):
            The FID Inception (`load_fid_inception`), or any network from uint8 images to features; `None` skips
            FID and KID.
        batch_size (`int`, defaults to 64):
            Images per forward pass of `inception`.
        device (`str` or `torch.device`, defaults to `"cpu"`):
            Where `inception` runs.
        seed (`int`, defaults to 0):
            Draws KID's subsets.
        count_mirrored_copies (`bool`, defaults to `False`):
            Count a sample whose mirror image is a copy as memorised too: for a model trained with random flips,
            which learns the mirrored faces as well.
    """

    def __init__(
        self,
        reference: torch.Tensor,
        inception: nn.Module | None = None,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        seed: int = 0,
        count_mirrored_copies: bool = False,
    ):
        if len(reference) < 2:
            raise ValueError(f"The reference set needs at least 2 images, got {len(reference)}.")
        self.reference = reference
        self.inception = inception
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.count_mirrored_copies = count_mirrored_copies
        self.pixel_pca = PixelPCA.fit(reference)
        self.reference_pca_features = extract_features(self.pixel_pca, reference)
        self.reference_inception_features = (
            None if inception is None else extract_features(inception, reference, batch_size, device)
        )
        self.memorisation_threshold = memorisation_threshold(reference)
        self.reference_high_frequency_energy = high_frequency_energy(reference)

    def score(self, samples: torch.Tensor) -> dict[str, float]:
        """
        Args:
            samples (`torch.Tensor`):
                uint8 (M, C, H, W), M >= 2, the reference's image size.

        Returns:
            `dict[str, float]`: `pixel_pca_fd`, `pixel_pca_kid_mean`, `pixel_pca_kid_std`, `memorised_share`,
            `high_frequency_ratio` (the samples' `high_frequency_energy` over the reference's: 1 for as fine a
            detail as the reference, above 1 for grain, below 1 for blur) and, with an Inception, `fid`,
            `kid_mean`, `kid_std`.
        """
        if len(samples) < 2:
            raise ValueError(f"Scoring needs at least 2 samples, got {len(samples)}.")
        if samples.shape[1:] != self.reference.shape[1:]:
            raise ValueError(
                f"Samples of shape {tuple(samples.shape[1:])} against a reference of shape "
                f"{tuple(self.reference.shape[1:])}."
            )
        scores = {}
        if self.inception is not None:
            features = extract_features(self.inception, samples, self.batch_size, self.device)
            scores["fid"] = frechet_distance(self.reference_inception_features, features)
            scores["kid_mean"], scores["kid_std"] = kernel_distance(
                self.reference_inception_features, features, self.seed
            )
        pca_features = extract_features(self.pixel_pca, samples)
        scores["pixel_pca_fd"] = frechet_distance(self.reference_pca_features, pca_features)
        # The FD's bias dominates at a few hundred samples; KID's estimate is unbiased, so it shows small differences.
        scores["pixel_pca_kid_mean"], scores["pixel_pca_kid_std"] = kernel_distance(
            self.reference_pca_features, pca_features, self.seed
        )
        copies = nearest_distances(samples, self.reference) < self.memorisation_threshold
        if self.count_mirrored_copies:
            copies |= nearest_distances(samples.flip(-1), self.reference) < self.memorisation_threshold
        scores["memorised_share"] = copies.double().mean().item()
        scores["high_frequency_ratio"] = _ratio(high_frequency_energy(samples), self.reference_high_frequency_energy)
        return scores


class _Precomputed(nn.Module):
    """Hands features computed beforehand to torchmetrics, whose metrics otherwise run a network on images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _ratio(value: float, reference: float) -> float:
    """`value / reference`, where a reference of flat images has no detail to compare with (zero energy)."""
    if reference > 0:
        return value / reference
    return math.inf if value > 0 else 1.0


def _resized_pixels(images: torch.Tensor, side: int) -> torch.Tensor:
    # A batch at a time: a whole reference in float64 at full size would take gigabytes at 256 px.
    resized = [
        F.interpolate(batch.double() / 255, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        for batch in images.split(RESIZE_BATCH_SIZE)
    ]
    return torch.cat(resized).flatten(1)


def _download_inception_weights(destination: Path) -> Path | None:
    """Fetch the weights into torch hub's cache; `None` offline or when the download fails."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return None
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(destination), INCEPTION_WEIGHTS_SHA256_PREFIX)
    except (OSError, RuntimeError):  # no network, or a file that fails the hash check
        return None
    return destination
