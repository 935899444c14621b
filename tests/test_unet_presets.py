"""UNet presets: every documented configuration builds, runs and has the documented size."""

import re

import pytest
import torch

import facediff.unet_presets as unet_presets
from facediff import build_unet
from facediff.unet_presets import PRESET_TABLE, forward_gflops, unet_config


def documented_rows():
    """(preset, resolution, channels) -> (parameters in millions, GFLOPs), from the module docstring's table."""
    rows = re.findall(r"\| (\w+) +\| (\d+) +\| (\d) +\| ([\d.]+)M +\| ([\d.]+) +\|", unet_presets.__doc__)
    return {(p, int(r), int(c)): (float(m), float(g)) for p, r, c, m, g in rows}


def test_docstring_table_lists_every_tested_configuration():
    assert sorted(documented_rows()) == sorted(PRESET_TABLE)


@pytest.mark.parametrize("preset,resolution,channels", PRESET_TABLE)
def test_documented_parameter_count(preset, resolution, channels):
    unet = build_unet(preset, resolution, channels)
    millions = sum(p.numel() for p in unet.parameters()) / 1e6
    assert millions == pytest.approx(documented_rows()[preset, resolution, channels][0], abs=0.01)


@pytest.mark.parametrize("preset,resolution,channels", [row for row in PRESET_TABLE if row[1] <= 64])
def test_documented_gflops(preset, resolution, channels):
    gflops = forward_gflops(build_unet(preset, resolution, channels))
    assert gflops == pytest.approx(documented_rows()[preset, resolution, channels][1], rel=0.01)


def test_base_at_32_is_the_ddpm_cifar_model():
    config = unet_config("base", 32, 3)
    assert config["block_out_channels"] == (128, 256, 256, 256) and config["layers_per_block"] == 2
    assert config["down_block_types"][1] == "AttnDownBlock2D"  # attention at 16x16
    millions = sum(p.numel() for p in build_unet("base", 32, 3).parameters()) / 1e6
    assert millions == pytest.approx(35.7, abs=0.1)


@pytest.mark.parametrize("resolution", [16, 24, 32, 48, 64, 96, 128, 160, 256])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("preset", ["small", "narrow"])
def test_cpu_presets_map_images_to_same_shape(preset, resolution, channels):
    unet = build_unet(preset, resolution, channels)
    x = torch.randn(2, channels, resolution, resolution)
    with torch.no_grad():
        out = unet(x, torch.tensor([0, 999])).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("resolution", [16, 24, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_tiny_has_three_levels_of_16_32_48_channels_at_each_size_it_serves(resolution, channels):
    config = unet_config("tiny", resolution, channels)
    assert config["block_out_channels"] == (16, 32, 48) and len(config["down_block_types"]) == 3
    x = torch.randn(2, channels, resolution, resolution)
    with torch.no_grad():
        out = build_unet("tiny", resolution, channels)(x, torch.tensor([0, 999])).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"preset": "huge"}, "Unknown UNet preset 'huge'; choose one of small, narrow, tiny, base"),
        ({"channels": 4}, "channels must be 1"),
        ({"resolution": 8}, "between 16 and 256"),
        ({"resolution": 512}, "between 16 and 256"),
        ({"resolution": 200}, "resolution 200 is not divisible by 32.*use 192 or 224"),
        ({"resolution": 36}, "resolution 36 is not divisible by 8.*use 32 or 40"),
        ({"preset": "tiny", "resolution": 64}, "'tiny' preset serves images of at most 32 pixels, got 64"),
    ],
)
def test_bad_preset_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        unet_config(**kwargs)


@pytest.mark.parametrize("resolution", [16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256])
def test_base_has_self_attention_at_the_level_nearest_16x16(resolution):
    # Resolutions that never halve to 16 (24, 48, 96, ...) still get the preset's attention level, not none.
    config = unet_config("base", resolution, 3)
    down_blocks = config["down_block_types"]
    sizes = [resolution // 2**level for level in range(len(down_blocks))]
    with_attention = [size for size, block in zip(sizes, down_blocks, strict=True) if block == "AttnDownBlock2D"]
    assert with_attention == [min(sizes, key=lambda size: abs(size - 16))]
    assert config["up_block_types"] == tuple(block.replace("Down", "Up") for block in reversed(down_blocks))
