"""The precision that computes fastest on a device: bfloat16 where the hardware computes it natively, float32
elsewhere (where bfloat16 is emulated, and slower than float32)."""

import torch

# What torch reports of the CPU's native bfloat16 units: AMX tiles (Sapphire Rapids and later) and AVX512-BF16.
CPU_BF16_CHECKS = (
    ("AMX", getattr(torch.cpu, "_is_amx_tile_supported", None)),
    ("AVX512-BF16", getattr(torch.cpu, "_is_avx512_bf16_supported", None)),
)


def native_bf16(device: str | torch.device) -> tuple[bool, str]:
    """
    Whether `device` computes bfloat16 natively, and what says so.

    Args:
        device (`str` or `torch.device`):
            A CPU or an accelerator.

    Returns:
        `tuple[bool, str]`: the answer, and its reason in a few words.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} computes bfloat16 natively"
        return False, f"{name} has no native bfloat16"
    if device.type == "cpu":
        units = [name for name, check in CPU_BF16_CHECKS if check is not None and check()]
        if units:
            return True, f"this CPU computes bfloat16 natively ({', '.join(units)})"
        return False, "this CPU has no native bfloat16 (no AMX or AVX512-BF16), where float32 is faster"
    return False, f"bfloat16 is not chosen automatically on {device.type}"


def sampling_precision(device: str | torch.device) -> tuple[torch.dtype | None, str]:
    """
    The half precision for the low-noise half of a sampling chain (the pipeline's `low_noise_dtype`; the UNet's
    weights stay float32): bfloat16 where `device` computes it natively, none elsewhere. With one line that says
    which and why.

    Args:
        device (`str` or `torch.device`):
            Where the model runs.

    Returns:
        `tuple[torch.dtype | None, str]`
    """
    native, reason = native_bf16(device)
    return (torch.bfloat16, f"float32, bfloat16 below t = T/2: {reason}") if native else (None, f"float32: {reason}")
