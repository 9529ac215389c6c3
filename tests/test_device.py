"""Device, autocast dtype and memory format: one place decides, CPU falls back cleanly."""

from __future__ import annotations

import pytest
import torch

from bonecomp import device as device_mod
from bonecomp.config import ConfigError
from bonecomp.device import amp_dtype, pick_device, resolve_channels_last

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_and_cpu():
    assert pick_device("cpu") == CPU
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == want


def test_missing_cuda_names_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == CPU
    with pytest.raises(ConfigError, match=r"infer\.device='cuda:1' but CUDA is not available"):
        pick_device("cuda:1", "infer.device")
    with pytest.raises(ConfigError, match=r"train\.device='cuda'"):
        pick_device("cuda")


def test_cuda_index_beyond_the_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=r"train\.device='cuda:1' but only 1 CUDA"):
        pick_device("cuda:1")


def test_not_a_device():
    with pytest.raises(ConfigError, match=r"infer\.device='gpu' is not a device"):
        pick_device("gpu", "infer.device")


@pytest.mark.parametrize(
    "dev, enabled, capability, want",
    [
        (CPU, True, (9, 0), None),  # no autocast on CPU
        (CUDA, False, (9, 0), None),
        (CUDA, True, (9, 0), torch.bfloat16),  # H100
        (CUDA, True, (8, 0), torch.bfloat16),  # A100
        (CUDA, True, (7, 0), torch.float16),  # V100: bf16 only emulated
        (CUDA, True, (7, 5), torch.float16),  # T4
    ],
)
def test_amp_dtype(monkeypatch, dev, enabled, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation
    monkeypatch.setattr(device_mod.torch.version, "hip", None)
    assert amp_dtype(dev, enabled) is want


@pytest.mark.parametrize(
    "setting, dev, want",
    [("auto", CPU, False), ("auto", CUDA, True), (True, CPU, True), (False, CUDA, False)],
)
def test_channels_last(setting, dev, want):
    assert resolve_channels_last(setting, dev) is want


def test_channels_last_rejects_other_strings():
    with pytest.raises(ConfigError, match="channels_last"):
        resolve_channels_last("yes", CPU)
