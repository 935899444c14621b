"""`facediff eval` and `facediff.evaluation`. The Inception weights cannot be fetched here, so the metrics run on
randomly initialised networks and the tests check what holds whatever the weights: a set against itself scores zero,
a shifted set scores higher, exact copies are flagged as memorised."""

import json
import math
import re

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from scipy import ndimage
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from facediff import FaceDiffPipeline, FaceDiffScheduler, build_unet
from facediff.atomic_files import write_json
from facediff.cli import main
from facediff.evaluation import (
    CHUNK_BYTES,
    PixelPCA,
    SampleEvaluator,
    high_frequency_energy,
    load_fid_inception,
    load_reference,
    memorisation_threshold,
    nearest_distances,
)
from facediff.fid_inception import FIDInceptionV3
from facediff.model_card import (
    EVAL_RESULTS_NAME,
    evaluation_facts,
    evaluation_table,
    model_digest,
    pipeline_model_card,
    refresh_card_evaluation,
    write_model_card,
)

from .conftest import FACES


class RandomFeatures(nn.Module):
    """A small randomly initialised conv net from uint8 images to 32 features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() / 127.5 - 1).flatten(1)


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    return load_reference(str(FACES), resolution=32, channels=1)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A weights file laid out as the FID one, with random values scaled so that features stay far from zero."""
    torch.manual_seed(0)
    state_dict = FIDInceptionV3().state_dict()
    for name, value in state_dict.items():
        if name.endswith("conv.weight"):
            nn.init.kaiming_normal_(value, nonlinearity="relu")
    state_dict |= {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state_dict, path)
    return path


def brighter(images: torch.Tensor, shift: int) -> torch.Tensor:
    return (images.int() + shift).clamp(0, 255).to(torch.uint8)


def test_scores_are_zero_for_the_reference_itself_and_grow_with_a_brightness_shift(faces):
    evaluator = SampleEvaluator(faces, inception=RandomFeatures())
    scores = [evaluator.score(brighter(faces, shift)) for shift in (0, 8, 24, 64)]
    for name in ("fid", "kid_mean", "pixel_pca_fd", "pixel_pca_kid_mean"):
        values = [score[name] for score in scores]
        # KID's unbiased estimate of a set against itself is off zero by about 1/N of its scale: 40 images here.
        tolerance = 1e-3 if name in ("fid", "pixel_pca_fd") else 5e-2
        assert abs(values[0]) < tolerance * values[-1], (name, values)
        assert values == sorted(values) and len(set(values)) == len(values), (name, values)


def test_results_from_before_the_pixel_pca_kid_still_make_a_table():
    row = {"steps": 100, "pixel_pca_fd": 2.5, "memorised_share": 0.0}  # eval_results.json written before that column
    assert evaluation_table({"rows": [row]}).splitlines()[2] == "| 100 | 2.500 | n/a | 0.0% | n/a |"


def test_high_frequency_energy_is_scipy_laplacian_energy_and_the_ratio_sees_grain_and_blur(faces):
    torch.manual_seed(0)
    rgb = torch.randint(0, 256, (3, 3, 9, 7), dtype=torch.uint8)
    # scipy's Laplacian over the interior (where its border mode plays no part), each channel on its own.
    interior = [ndimage.laplace(image.double().numpy() / 255)[1:-1, 1:-1] for image in rgb.flatten(0, 1)]
    assert high_frequency_energy(rgb) == pytest.approx(np.mean(np.square(interior)), rel=1e-12)

    evaluator = SampleEvaluator(faces)
    grain = (faces.float() + 12 * torch.randn(faces.shape)).round().clamp(0, 255).to(torch.uint8)
    blur = torch.nn.functional.avg_pool2d(faces.float(), 3, stride=1, padding=1, count_include_pad=False)
    ratios = [evaluator.score(images)["high_frequency_ratio"] for images in (faces, grain, blur.round().byte())]
    assert ratios[0] == 1.0 and ratios[1] > 1.5 and ratios[2] < 0.5, ratios
    flat = torch.full((4, 1, 8, 8), 128, dtype=torch.uint8)
    assert SampleEvaluator(torch.cat([flat, flat + 1])).score(flat)["high_frequency_ratio"] == 1.0


def test_reference_loads_at_sizes_no_preset_takes():
    # A model with its own UNet config may be 12 or 512 pixels wide; the presets' 16-256 range must not stop its eval.
    reference = load_reference(str(FACES), resolution=12, channels=3, max_images=4)
    assert reference.shape == (4, 3, 12, 12) and reference.dtype == torch.uint8
    assert torch.equal(reference[:, 0], reference[:, 2])  # gray faces, repeated into RGB


def test_kid_and_fid_are_finite_on_a_handful_of_images(faces):
    scores = SampleEvaluator(faces[:10], inception=RandomFeatures()).score(faces[10:15])
    assert all(math.isfinite(value) for value in scores.values()), scores
    assert scores["kid_std"] > 0  # the subsets of 5 of the 10 reference images differ


def test_memorisation_flags_copies_and_near_copies_but_not_noise(faces):
    evaluator = SampleEvaluator(faces)
    torch.manual_seed(0)
    near_copies = (faces[5:8].int() + torch.randint(-3, 4, faces[5:8].shape)).clamp(0, 255).to(torch.uint8)
    noise = torch.randint(0, 256, (5, *faces.shape[1:]), dtype=torch.uint8)
    assert evaluator.score(torch.cat([faces[:3], near_copies, noise]))["memorised_share"] == 6 / 11
    assert evaluator.score(noise)["memorised_share"] == 0
    # Duplicates in the reference set leave the threshold where it was, instead of pulling it to zero.
    with_duplicates = memorisation_threshold(torch.cat([faces, faces[:40]]))
    assert with_duplicates == pytest.approx(evaluator.memorisation_threshold, rel=0.2)


def test_fid_inception_takes_gray_and_rgb_and_loads_the_fid_weights_layout(random_inception_weights, tmp_path):
    inception = load_fid_inception(random_inception_weights)
    gray = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    with torch.inference_mode():
        features = inception(gray)
        assert features.shape == (2, 2048)
        assert features.abs().mean() > 1e-3
        assert torch.equal(features, inception(gray.expand(-1, 3, -1, -1)))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="is not the FID Inception weights"):
        load_fid_inception(tmp_path / "other.pth")


def test_fid_inception_matches_torchmetrics_default_network(random_inception_weights):
    """Where torch-fidelity (and so torchvision) is installed: the same features as torchmetrics' own Inception."""
    pytest.importorskip("torch_fidelity")
    from torchmetrics.image.fid import NoTrainInceptionV3

    theirs = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(random_inception_weights))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        torch.testing.assert_close(load_fid_inception(random_inception_weights)(images), theirs(images))


def test_eval_writes_a_table_json_and_the_card_model_index(gray_pipeline, random_inception_weights, tmp_path, capsys):
    model = tmp_path / "model"
    gray_pipeline.save_pretrained(model)
    (model / "README.md").write_text("---\nlibrary_name: diffusers\n---\n\n# model\n\n## Usage\n\nDraw faces.\n")
    flags = ["--reference", str(FACES), "--num-images", "2", "--steps", "2", "1", "--max-reference", "4"]
    assert main(["eval", str(model), *flags, "--inception-weights", str(random_inception_weights)]) == 0

    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "| steps | FID | KID | pixel-PCA FD | pixel-PCA KID | memorised | high-frequency ratio |"
    assert [line.split(" | ")[0] for line in printed[2:4]] == ["| 2", "| 1"]
    assert printed[4] == f"Wrote {model / 'eval_results.json'} and refreshed {model / 'README.md'}"
    results = json.loads((model / "eval_results.json").read_text())
    assert results["num_images"] == 2 and results["num_reference"] == 4
    assert results["reference_name"] == "faces/train"
    assert [row["steps"] for row in results["rows"]] == [2, 1]
    scores = {
        "fid",
        "kid_mean",
        "kid_std",
        "pixel_pca_fd",
        "pixel_pca_kid_mean",
        "pixel_pca_kid_std",
        "memorised_share",
        "high_frequency_ratio",
    }
    assert set(results["rows"][0]) == {"steps", *scores, "sampling_seconds"}

    refresh_card_evaluation(model)  # refreshing again replaces the section instead of adding another
    card = ModelCard.load(model / "README.md")
    assert card.data.model_name == "model"
    metrics = [(result.metric_type, result.metric_name) for result in card.data.eval_results]
    assert metrics[:6] == [
        ("fid", "FID (2 steps, 2 samples)"),
        ("kid", "KID (2 steps, 2 samples)"),
        ("pixel-pca-fd", "pixel-PCA FD (2 steps, 2 samples)"),
        ("pixel-pca-kid", "pixel-PCA KID (2 steps, 2 samples)"),
        ("memorised-share", "memorised share (2 steps, 2 samples)"),
        ("high-frequency-ratio", "high-frequency ratio (2 steps, 2 samples)"),
    ]
    assert len(metrics) == 12
    # A local --reference is no Hub dataset: the Hub would read its path as a dataset id.
    assert {(result.dataset_type, result.dataset_name) for result in card.data.eval_results} == {
        ("imagefolder", "faces/train")
    }
    assert card.text.count("## Evaluation") == 1 and "## Usage\n\nDraw faces." in card.text
    assert "| steps | FID | KID | pixel-PCA FD | pixel-PCA KID | memorised | high-frequency ratio |" in card.text
    # A card rendered from the template, as training writes it, picks the results up too.
    card = ModelCard.load(write_model_card({"model_name": "model"}, model))
    assert len(card.data.eval_results) == 12 and card.text.count("## Evaluation") == 1
    assert "2 samples per row (seed 0, `variance_type` fixed_large) against 4 images of `faces/train`" in card.text

    # Results of other weights (the folder retrained or resumed) are not the card's.
    config = model / "unet" / "config.json"
    config.write_text(config.read_text() + "\n")
    assert evaluation_facts(model) == {}


def test_missing_inception_weights_say_how_to_provide_them(gray_pipeline, tmp_path, monkeypatch, capsys):
    gray_pipeline.save_pretrained(tmp_path / "model")
    flags = ["eval", str(tmp_path / "model"), "--reference", str(FACES)]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(flags) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: The FID Inception weights are not in {tmp_path / 'torch' / 'hub' / 'checkpoints'}")
    assert "--inception-weights PATH" in line and "--no-inception" in line

    assert main([*flags, "--inception-weights", str(tmp_path / "missing.pth")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: --inception-weights {tmp_path / 'missing.pth'} is not a file: download ")
    assert line.endswith("; --inception-weights PATH passes it, --no-inception skips FID and KID.")


def test_empty_inception_weights_file_gives_one_line(gray_pipeline, tmp_path, capsys):
    gray_pipeline.save_pretrained(tmp_path / "model")
    (tmp_path / "empty.pth").write_bytes(b"")  # torch.load's EOFError carries no message
    flags = ["eval", str(tmp_path / "model"), "--reference", str(FACES)]
    assert main([*flags, "--inception-weights", str(tmp_path / "empty.pth")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    empty = tmp_path / "empty.pth"
    assert line.startswith(f"error: --inception-weights {empty} is not the FID Inception weights (EOFError): download ")
    assert not (tmp_path / "model" / EVAL_RESULTS_NAME).exists()


def test_eval_input_errors_are_one_line(gray_pipeline, tmp_path, capsys):
    gray_pipeline.save_pretrained(tmp_path / "model")
    assert main(["eval", str(tmp_path / "model"), "--reference", str(tmp_path / "nowhere"), "--no-inception"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --reference {tmp_path / 'nowhere'} does not exist: pass a folder of images, a save_to_disk folder "
        "or a Hub dataset id."
    ]
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "model"), "--reference", str(tmp_path / "empty"), "--no-inception"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --reference {tmp_path / 'empty'} is empty: put images in it (subfolders are searched too)."
    ]
    assert main(["eval", "user/model", "--reference", str(FACES), "--no-inception"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: user/model is not a local folder: pass the path of a saved pipeline, or --out FILE for the results "
        "of a Hub model."
    ]
    # A mistyped folder is named as such, not taken for a Hub model whose results need --out.
    assert main(["eval", str(tmp_path / "modle"), "--reference", str(FACES), "--no-inception"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'modle'} is neither a folder nor a Hub repo id (user/name): pass a folder written by "
        "save_pretrained or a repo id."
    ]
    assert main(["eval", str(tmp_path / "model"), "--reference", str(FACES), "--no-inception", "--steps", "2000"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --steps 2000 is more than the model's 1000 training steps: pass --steps 1000 or fewer, or leave it "
        "out for all of them."
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty", "model"]  # nothing written
    assert not (tmp_path / "model" / EVAL_RESULTS_NAME).exists()


def test_eval_checks_the_card_before_sampling(gray_pipeline, tmp_path, capsys):
    model = tmp_path / "model"
    gray_pipeline.save_pretrained(model)
    (model / "README.md").write_text("---\nlicense: [mit\ntags: x\n---\n\n# model\n")
    before = sorted(path.name for path in model.iterdir())
    flags = ["--reference", str(FACES), "--num-images", "2", "--steps", "2", "--max-reference", "4"]
    assert main(["eval", str(model), *flags, "--no-inception"]) == 2
    (line,) = capsys.readouterr().err.splitlines()  # one line: no progress bar was started
    assert line.startswith(f"error: {model / 'README.md'} has metadata that does not parse (while parsing a flow ")
    assert line.endswith("fix the YAML between the --- lines at its top, or pass --out FILE to leave the card alone.")
    assert sorted(path.name for path in model.iterdir()) == before  # no results, no partial file


def test_eval_checks_out_before_sampling(gray_pipeline, tmp_path, capsys):
    gray_pipeline.save_pretrained(tmp_path / "model")
    (tmp_path / "results").mkdir()
    (tmp_path / "a_file").write_text("")
    flags = ["eval", str(tmp_path / "model"), "--reference", str(FACES), "--no-inception", "--steps", "2"]
    assert main([*flags, "--out", str(tmp_path / "results")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out {tmp_path / 'results'} is a folder: pass a file path, such as "
        f"{tmp_path / 'results' / 'results.json'}."
    ]
    assert main([*flags, "--out", str(tmp_path / "a_file" / "results.json")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: Cannot write --out {tmp_path / 'a_file' / 'results.json'} ({tmp_path / 'a_file'} is not a writable "
        "folder): choose a path in a writable folder."
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file", "model", "results"]
    assert not any((tmp_path / "results").iterdir())


def test_write_json_leaves_no_partial_file_when_it_fails(tmp_path):
    (tmp_path / "results").mkdir()
    with pytest.raises(OSError):
        write_json(tmp_path / "results", {"rows": []})  # the final rename onto a folder fails
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results"]


def test_eval_samples_a_repeated_step_count_once(gray_pipeline, tmp_path, capsys):
    gray_pipeline.save_pretrained(tmp_path / "model")
    flags = ["--reference", str(FACES), "--num-images", "2", "--max-reference", "4", "--no-inception"]
    assert main(["eval", str(tmp_path / "model"), *flags, "--steps", "2", "1", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in printed[2:-1]] == ["| 2", "| 1"]
    results = json.loads((tmp_path / "model" / EVAL_RESULTS_NAME).read_text())
    assert [row["steps"] for row in results["rows"]] == [2, 1]


def test_card_names_a_hub_reference_by_its_id_and_a_local_one_as_imagefolder(gray_pipeline, tmp_path):
    model = tmp_path / "model"
    gray_pipeline.save_pretrained(model)
    row = {"steps": 2, "pixel_pca_fd": 2.5, "pixel_pca_kid_mean": 0.1, "pixel_pca_kid_std": 0.2, "memorised_share": 0}
    results = {
        "model_digest": model_digest(model),
        "num_images": 2,
        "num_reference": 4,
        "seed": 0,
        "variance_type": "fixed_large",
        "eta": None,
        "pixel_pca_components": 3,
        "memorisation_percentile": 1.0,
        "rows": [row],
    }

    def dataset_of_card(**reference):
        write_json(model / EVAL_RESULTS_NAME, results | reference)
        return {(result.dataset_type, result.dataset_name) for result in evaluation_facts(model)["eval_results"]}

    hub = {"reference": "user/faces", "reference_name": "user/faces"}
    local = {"reference": "data/faces/train", "reference_name": "faces/train"}
    assert dataset_of_card(**hub, reference_dataset_id="user/faces") == {("user/faces", "user/faces")}
    assert dataset_of_card(**local, reference_dataset_id=None) == {("imagefolder", "faces/train")}
    # Results written before reference_dataset_id was recorded: a Hub id was recorded as its own name.
    assert dataset_of_card(**hub) == {("user/faces", "user/faces")}
    assert dataset_of_card(**local) == {("imagefolder", "faces/train")}


@pytest.mark.parametrize("num_train_timesteps, usage_steps", [(10, 10), (1000, 100)])
def test_card_usage_asks_for_no_more_steps_than_the_model_has(num_train_timesteps, usage_steps):
    torch.manual_seed(0)
    scheduler = FaceDiffScheduler(num_train_timesteps=num_train_timesteps)
    pipeline = FaceDiffPipeline(unet=build_unet("small", 16, 1), scheduler=scheduler)
    card = str(pipeline_model_card(pipeline, "user/tiny"))
    snippet_steps = [int(steps) for steps in re.findall(r"num_inference_steps=(\d+)", card)]
    # The facediff and the plain diffusers sampling snippets, then inpainting, image-to-image and interpolation.
    assert snippet_steps[:4] == [usage_steps] * 4 and snippet_steps[4] <= usage_steps
    scheduler.set_timesteps(usage_steps)  # what the snippet asks for, the sampler takes


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation makes: the working set of a pass over images."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.nbytes)
        return output


def test_pixel_passes_stay_bounded_at_256_pixels():
    # 200 RGB images at 256 px are 39 MB of uint8 but 315 MB as float64: neither the memorisation distances nor the
    # PCA fit may make the whole set in float64 at once (a 1,000-image reference would take gigabytes).
    images = torch.randint(0, 256, (200, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    float64_bytes = images.numel() * 8
    with LargestTensor() as distances_pass:
        nearest = nearest_distances(images[:100], images, skip_identical=True)
    with LargestTensor() as pca_pass:
        PixelPCA.fit(images)
    assert distances_pass.largest <= CHUNK_BYTES * 1.1 < float64_bytes / 4
    assert pca_pass.largest < float64_bytes / 2
    # Across chunks, each query still finds its nearest other image.
    distances = torch.cdist(images[:3].flatten(1).double() / 255, images.flatten(1).double() / 255)
    distances[torch.arange(3), torch.arange(3)] = math.inf
    torch.testing.assert_close(nearest[:3], distances.min(dim=1).values, rtol=1e-9, atol=0)
