"""`facediff eval` and `facediff.evaluation`. The Inception weights cannot be fetched here, so the metrics run on
randomly initialised networks and the tests check what holds whatever the weights: a set against itself scores zero,
a shifted set scores higher, exact copies are flagged as memorised."""

import json
import math

import pytest
import torch
from huggingface_hub import ModelCard
from torch import nn

from facediff.cli import main
from facediff.evaluation import SampleEvaluator, load_fid_inception, load_reference, memorisation_threshold
from facediff.fid_inception import FIDInceptionV3
from facediff.model_card import evaluation_facts, evaluation_table, refresh_card_evaluation, write_model_card

from .conftest import OLIVETTI


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
    return load_reference(str(OLIVETTI), resolution=32, channels=1)


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
        assert abs(values[0]) < 1e-3 * values[-1], (name, values)
        assert values == sorted(values) and len(set(values)) == len(values), (name, values)


def test_results_from_before_the_pixel_pca_kid_still_make_a_table():
    row = {"steps": 100, "pixel_pca_fd": 2.5, "memorised_share": 0.0}  # eval_results.json written before that column
    assert evaluation_table({"rows": [row]}).splitlines()[2] == "| 100 | 2.500 | n/a | 0.0% |"


def test_reference_loads_at_sizes_no_preset_takes():
    # A model with its own UNet config may be 12 or 512 pixels wide; the presets' 16-256 range must not stop its eval.
    reference = load_reference(str(OLIVETTI), resolution=12, channels=3, max_images=4)
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
    flags = ["--reference", str(OLIVETTI), "--num-images", "2", "--steps", "2", "1", "--max-reference", "4"]
    assert main(["eval", str(model), *flags, "--inception-weights", str(random_inception_weights)]) == 0

    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "| steps | FID | KID | pixel-PCA FD | pixel-PCA KID | memorised |"
    assert [line.split(" | ")[0] for line in printed[2:4]] == ["| 2", "| 1"]
    assert printed[4] == f"Wrote {model / 'eval_results.json'} and refreshed {model / 'README.md'}"
    results = json.loads((model / "eval_results.json").read_text())
    assert results["num_images"] == 2 and results["num_reference"] == 4
    assert results["reference_name"] == "olivetti-faces/train"
    assert [row["steps"] for row in results["rows"]] == [2, 1]
    scores = {
        "fid",
        "kid_mean",
        "kid_std",
        "pixel_pca_fd",
        "pixel_pca_kid_mean",
        "pixel_pca_kid_std",
        "memorised_share",
    }
    assert set(results["rows"][0]) == {"steps", *scores, "sampling_seconds"}

    refresh_card_evaluation(model)  # refreshing again replaces the section instead of adding another
    card = ModelCard.load(model / "README.md")
    assert card.data.model_name == "model"
    metrics = [(result.metric_type, result.metric_name) for result in card.data.eval_results]
    assert metrics[:5] == [
        ("fid", "FID (2 steps, 2 samples)"),
        ("kid", "KID (2 steps, 2 samples)"),
        ("pixel-pca-fd", "pixel-PCA FD (2 steps, 2 samples)"),
        ("pixel-pca-kid", "pixel-PCA KID (2 steps, 2 samples)"),
        ("memorised-share", "memorised share (2 steps, 2 samples)"),
    ]
    assert len(metrics) == 10
    assert card.text.count("## Evaluation") == 1 and "## Usage\n\nDraw faces." in card.text
    assert "| steps | FID | KID | pixel-PCA FD | pixel-PCA KID | memorised |" in card.text
    # A card rendered from the template, as training writes it, picks the results up too.
    card = ModelCard.load(write_model_card({"model_name": "model"}, model))
    assert len(card.data.eval_results) == 10 and card.text.count("## Evaluation") == 1
    assert (
        "2 samples per row (seed 0, `variance_type` fixed_large) against 4 images of `olivetti-faces/train`"
        in card.text
    )

    # Results of other weights (the folder retrained or resumed) are not the card's.
    config = model / "unet" / "config.json"
    config.write_text(config.read_text() + "\n")
    assert evaluation_facts(model) == {}


def test_missing_inception_weights_say_how_to_provide_them(gray_pipeline, tmp_path, monkeypatch, capsys):
    gray_pipeline.save_pretrained(tmp_path / "model")
    flags = ["eval", str(tmp_path / "model"), "--reference", str(OLIVETTI)]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(flags) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: The FID Inception weights are not in {tmp_path / 'torch' / 'hub' / 'checkpoints'}")
    assert "--inception-weights PATH" in line and "--no-inception" in line

    assert main([*flags, "--inception-weights", str(tmp_path / "missing.pth")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: --inception-weights {tmp_path / 'missing.pth'} is not a file: download ")


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
    assert main(["eval", "user/model", "--reference", str(OLIVETTI), "--no-inception"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: user/model is not a local folder: pass --out FILE for the results."
    ]
