"""Device choices in one place: which device, which autocast dtype, which memory format.

Training and inference each have their own keys (``train.device``/``train.amp``,
``infer.device``/``infer.amp``); both resolve them here, so bf16/fp16 is picked once.
"""

from __future__ import annotations

import torch

from bonecomp.config import ConfigError


def pick_device(pref: str, key: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:1``, ``mps``.

    Asking for a device that is not there is a ``ConfigError`` naming ``key``.
    """
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(pref)
    except RuntimeError as e:
        raise ConfigError(f"{key}={pref!r} is not a device (auto, cpu, cuda, cuda:1)", key) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={pref!r} but CUDA is not available; use auto or cpu", key)
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{key}={pref!r} but only {count} CUDA device(s) are visible", key)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}={pref!r} but MPS is not available; use auto or cpu", key)
    return dev


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """Autocast dtype: bf16 on GPUs that run it natively (Ampere+), fp16 on older CUDA
    GPUs (which then need a GradScaler in training), None when disabled or not on CUDA."""
    if not enabled or device.type != "cuda":
        return None
    if torch.version.hip:  # ROCm: torch knows whether the GPU has bf16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # torch.cuda.is_bf16_supported() is also True for emulated (slow) bf16 on pre-Ampere
    # GPUs, so ask for the compute capability instead.
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def resolve_channels_last(setting: bool | str, device: torch.device) -> bool:
    """``train.channels_last``: ``auto`` means on CUDA only (NHWC is the usual win there;
    on CPU it ran the demo model at 0.77x), ``true``/``false`` force it."""
    if setting == "auto":
        return device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ConfigError(f"channels_last must be true, false or 'auto', got {setting!r}")
