"""Encoder weights: ImageNet from the Hugging Face hub, or a local file.

Offline, ``imagenet`` fails within seconds with a message naming the alternatives
(instead of retrying the network for minutes); weights already in the local hub cache
still load.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from torch import nn

from bonecomp.checkpoint import CheckpointError, read_torch_file

T = TypeVar("T")


class WeightsError(RuntimeError):
    """Encoder weights that cannot be obtained or do not fit the encoder."""


def with_imagenet_weights(build: Callable[[], T], encoder: str, timeout: float = 3.0) -> T:
    """Run ``build`` (which downloads ImageNet weights) from the hub cache, else online."""
    try:
        with hub_offline():
            return build()
    except Exception:  # not cached, or the cache is unusable: try the network
        pass
    host = hub_host()
    if not reachable(host, port=443, timeout=timeout):
        raise WeightsError(
            f"model.encoder_weights=imagenet: the ImageNet weights of {encoder!r} are not in "
            f"the local cache and {host} is unreachable (offline?). Use "
            "model.encoder_weights=null to train from scratch, or "
            "model.encoder_weights=/path/to/weights.pth (or .safetensors) for a local file, "
            "or download the weights once on a machine that is online (Hugging Face cache)."
        )
    return build()


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load an encoder state dict from a file (.pth/.pt/.bin via torch, or .safetensors).

    Accepts a bare encoder state dict, or a model's (keys under ``encoder.``/``module.``/
    ``model.``, or nested in ``state_dict``/``model``); classifier keys are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"model.encoder_weights: {path} is not a file (use 'imagenet', null or a path)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors' own error type: a damaged or foreign file
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        try:  # weights only, and one line for a file that is damaged or not safe to load
            state = read_torch_file(path)
        except CheckpointError as e:
            raise WeightsError(str(e)) from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    own = encoder.state_dict()
    matched = {}
    for k, v in state.items():
        for prefix in ("", "encoder.", "module.", "model.", "module.encoder.", "net.encoder."):
            name = k[len(prefix) :] if k.startswith(prefix) else None
            if name in own and own[name].shape == getattr(v, "shape", None):
                matched[name] = v
                break
    if not matched:
        raise WeightsError(f"{path}: no tensor matches the encoder's parameters")
    missing = sorted(set(own) - set(matched))
    if len(missing) > 0.1 * len(own):
        raise WeightsError(
            f"{path}: only {len(matched)} of {len(own)} encoder tensors match "
            f"(missing e.g. {missing[:3]})"
        )
    encoder.load_state_dict(matched, strict=False)


@contextmanager
def hub_offline() -> Iterator[None]:
    """Within the block the Hugging Face hub reads its local cache only (no network)."""
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def hub_host() -> str:
    """The host name the hub downloads from (``HF_ENDPOINT`` honoured)."""
    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def reachable(host: str, port: int, timeout: float) -> bool:
    """TCP connect within ``timeout`` seconds (DNS included: it runs in a thread)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])
