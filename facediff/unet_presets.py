"""UNet2DModel presets for DDPM by resolution and channel count.

`base` follows the DDPM paper's networks (Ho et al. 2020, appendix B): 128 base channels, two residual blocks per
level, self-attention at 16x16 (at the level nearest it where the resolution never halves to 16), dropout 0.1; at
32x32 it is the 35.7M-parameter CIFAR-10 model. `small` keeps the layout at a quarter of the width, one block per
level and attention only in the middle block, so it trains on a laptop CPU; `narrow` is `small` at three quarters
of that width, for short runs on CPUs without native bfloat16. The channel multipliers per resolution are those of
DDPM (32, 256) and improved DDPM (64, 128). `tiny` has three levels of 16, 32 and 48 channels whatever the
resolution, and serves 16 to 32 px: the built-in digits' 8x8 images upscaled to 16 px carry little detail at full
resolution, so the width goes to the lower levels and the steps per minute up.

Parameters and forward GFLOPs (one image, multiply-add counted as 2 FLOPs), from `python benchmarks/unet_presets.py`:

| preset | resolution | channels | parameters | forward GFLOPs |
|--------|-----------:|---------:|-----------:|---------------:|
| small  | 16         | 1        | 1.06M      | 0.122          |
| small  | 32         | 1        | 1.47M      | 0.487          |
| small  | 32         | 3        | 1.48M      | 0.489          |
| small  | 64         | 3        | 3.48M      | 2.52           |
| small  | 128        | 3        | 3.59M      | 5.49           |
| small  | 256        | 3        | 4.65M      | 20.7           |
| narrow | 16         | 1        | 0.60M      | 0.0686         |
| narrow | 32         | 1        | 0.83M      | 0.274          |
| narrow | 32         | 3        | 0.83M      | 0.276          |
| narrow | 64         | 3        | 1.96M      | 1.42           |
| tiny   | 16         | 1        | 0.43M      | 0.0370         |
| base   | 32         | 3        | 35.75M     | 12.1           |
| base   | 64         | 3        | 82.96M     | 59.4           |
| base   | 256        | 3        | 113.67M    | 496            |
"""

from dataclasses import dataclass

import torch
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

MIN_RESOLUTION, MAX_RESOLUTION = 16, 256
# (largest resolution it serves, channel multiplier per level)
CHANNEL_MULTIPLIERS = (
    (16, (1, 2, 2)),
    (32, (1, 2, 2, 2)),
    (64, (1, 2, 3, 4)),
    (128, (1, 1, 2, 3, 4)),
    (256, (1, 1, 2, 2, 4, 4)),
)


@dataclass(frozen=True)
class UNetPreset:
    """The width and depth of a preset; its levels follow the resolution unless it fixes its own."""

    base_channels: int
    layers_per_block: int
    attention_resolution: int | None
    dropout: float
    norm_num_groups: int
    channel_multipliers: tuple[int, ...] | None = None
    max_resolution: int = MAX_RESOLUTION


UNET_PRESETS = {
    "small": UNetPreset(
        base_channels=32, layers_per_block=1, attention_resolution=None, dropout=0.0, norm_num_groups=8
    ),
    # `small` at three quarters of its width: more steps in the same minutes where float32 is the fast path (a CPU
    # with no native bfloat16), which is what a short run there lacks most (docs/recipes.md).
    "narrow": UNetPreset(
        base_channels=24, layers_per_block=1, attention_resolution=None, dropout=0.0, norm_num_groups=8
    ),
    # Three fixed levels for 16 to 32 px: the digits main job's UNet (docs/recipes.md).
    "tiny": UNetPreset(
        base_channels=16,
        layers_per_block=1,
        attention_resolution=None,
        dropout=0.0,
        norm_num_groups=8,
        channel_multipliers=(1, 2, 3),
        max_resolution=32,
    ),
    "base": UNetPreset(base_channels=128, layers_per_block=2, attention_resolution=16, dropout=0.1, norm_num_groups=32),
}


def unet_config(preset: str = "small", resolution: int = 32, channels: int = 3) -> dict:
    """
    The `UNet2DModel` config of a preset at a resolution and channel count.

    Args:
        preset (`str`, defaults to `"small"`):
            A key of `UNET_PRESETS`.
        resolution (`int`, defaults to 32):
            Image side in pixels, 16 to 256, divisible by the preset's downsampling at that size.
        channels (`int`, defaults to 3):
            1 for grayscale, 3 for RGB.

    Returns:
        `dict`: keyword arguments for `UNet2DModel(**config)` or `UNet2DModel.from_config(config)`.
    """
    if preset not in UNET_PRESETS:
        raise ValueError(f"Unknown UNet preset {preset!r}; choose one of {', '.join(UNET_PRESETS)}.")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ValueError(
            f"resolution must be between {MIN_RESOLUTION} and {MAX_RESOLUTION} pixels, got {resolution}: "
            "resize the images (--resolution) to a supported size."
        )
    spec = UNET_PRESETS[preset]
    if resolution > spec.max_resolution:
        raise ValueError(
            f"the {preset!r} preset serves images of at most {spec.max_resolution} pixels, got {resolution}: "
            "use narrow or small at this size."
        )
    multipliers = spec.channel_multipliers or next(
        mults for largest, mults in CHANNEL_MULTIPLIERS if resolution <= largest
    )
    downsampling = 2 ** (len(multipliers) - 1)
    if resolution % downsampling:
        lower = resolution - resolution % downsampling
        candidates = [size for size in (lower, lower + downsampling) if MIN_RESOLUTION <= size <= MAX_RESOLUTION]
        raise ValueError(
            f"resolution {resolution} is not divisible by {downsampling}, the downsampling of the {preset!r} preset "
            f"at this size: use {' or '.join(map(str, candidates))}."
        )

    feature_sizes = [resolution // 2**level for level in range(len(multipliers))]
    # At the level nearest the preset's attention size: 16x16 itself at power-of-two resolutions, 12x12 at 24, 48
    # or 96, which never reach 16x16.
    attention_size = None
    if spec.attention_resolution is not None:
        attention_size = min(feature_sizes, key=lambda size: abs(size - spec.attention_resolution))
    with_attention = [size == attention_size for size in feature_sizes]
    return {
        "sample_size": resolution,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": tuple(spec.base_channels * mult for mult in multipliers),
        "layers_per_block": spec.layers_per_block,
        "down_block_types": tuple("AttnDownBlock2D" if attn else "DownBlock2D" for attn in with_attention),
        "up_block_types": tuple("AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(with_attention)),
        "attention_head_dim": None,
        "dropout": spec.dropout,
        "norm_num_groups": spec.norm_num_groups,
    }


def build_unet(preset: str = "small", resolution: int = 32, channels: int = 3) -> UNet2DModel:
    """
    A freshly initialised `UNet2DModel` from a preset; see `unet_config` for the arguments.

    Returns:
        `UNet2DModel`
    """
    return UNet2DModel(**unet_config(preset, resolution, channels))


def forward_gflops(unet: UNet2DModel, batch_size: int = 1) -> float:
    """
    FLOPs of one forward pass, in GFLOP, counted by `torch.utils.flop_counter` (a multiply-add is 2 FLOPs).

    Args:
        unet (`UNet2DModel`):
            The model to count.
        batch_size (`int`, defaults to 1):
            Images per forward pass.

    Returns:
        `float`
    """
    config = unet.config
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    sample = torch.zeros(batch_size, config.in_channels, height, width, device=unet.device, dtype=unet.dtype)
    timestep = torch.zeros(batch_size, dtype=torch.long, device=unet.device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(sample, timestep)
    return counter.get_total_flops() / 1e9


# The configurations listed in the module docstring and tested in tests/test_unet_presets.py.
PRESET_TABLE = (
    ("small", 16, 1),
    ("small", 32, 1),
    ("small", 32, 3),
    ("small", 64, 3),
    ("small", 128, 3),
    ("small", 256, 3),
    ("narrow", 16, 1),
    ("narrow", 32, 1),
    ("narrow", 32, 3),
    ("narrow", 64, 3),
    ("tiny", 16, 1),
    ("base", 32, 3),
    ("base", 64, 3),
    ("base", 256, 3),
)
