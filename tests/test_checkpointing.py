"""Gradient checkpointing (``train.grad_checkpointing``): the same gradients and the same
BatchNorm statistics as the plain model, for less activation memory."""

from __future__ import annotations

import copy

import pytest
import torch

from bonecomp.config import ModelConfig
from bonecomp.models import create_model
from bonecomp.models.checkpointing import is_checkpointed, set_grad_checkpointing
from bonecomp.testing import tiny_config
from bonecomp.training import state as state_mod
from bonecomp.training.state import build_state


def _pair(
    arch: str, encoder: str, dtype: torch.dtype = torch.float64
) -> tuple[torch.nn.Module, torch.nn.Module, list[str]]:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, encoder=encoder, encoder_weights=None)
    plain = create_model(cfg).to(dtype).train()
    ckpt = copy.deepcopy(plain)
    return plain, ckpt, set_grad_checkpointing(ckpt)


def _step(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)  # drop-path / drop-connect draw the same masks in both models
    y = model(x)
    (y.square().mean() + y.mean()).backward()
    return y.detach()


@pytest.mark.parametrize(
    ("arch", "encoder", "where", "dtype"),
    [
        ("unet", "resnet18", "encoder.layer1.0", torch.float64),  # an smp encoder's blocks
        ("deeplabv3plus", "resnet18", "decoder.aspp", torch.float64),  # decoder children
        # timm's own checkpointing, U-Net++'s decoder blocks; smp's MBConv blocks with
        # drop-connect (float32: float64 depthwise convolutions are slow on a CPU, and
        # the recomputation runs the same kernels, so the result is as exact)
        ("unetplusplus", "tu-efficientnet_b0", "encoder (timm", torch.float32),
        ("unet", "efficientnet-b0", "encoder._blocks.0", torch.float32),
    ],
)
def test_checkpointing_gives_the_plain_models_gradients(arch, encoder, where, dtype):
    """Training mode: outputs, every gradient and every buffer (BatchNorm running
    statistics, batch counts) are bit for bit those of the plain model."""
    plain, ckpt, done = _pair(arch, encoder, dtype)
    assert any(d.startswith(where) for d in done), done
    x = torch.rand(2, 3, 32, 32, dtype=dtype)
    torch.testing.assert_close(_step(ckpt, x), _step(plain, x), rtol=0, atol=0)
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for n, p in ckpt.named_parameters():
        if grads[n] is None:
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0, msg=n)
    want = plain.state_dict()
    got = ckpt.state_dict()
    assert got.keys() == want.keys()  # checkpoints load either way
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_without_the_batchnorm_guard_the_recomputation_moves_the_statistics_twice():
    """Why the guard exists: a recomputed BatchNorm forward updates the running
    statistics again (same batch, twice the step) unless its momentum is 0 then."""
    plain, ckpt, _ = _pair("unet", "resnet18")
    for m in ckpt.modules():  # the guard's hooks, removed
        for h in getattr(m, "_bonecomp_bn_hooks", ()):
            h.remove()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    _step(plain, x), _step(ckpt, x)
    name = "net.encoder.layer1.0.bn1.running_mean"
    assert not torch.equal(ckpt.state_dict()[name], plain.state_dict()[name])
    tracked = "net.encoder.layer1.0.bn1.num_batches_tracked"
    assert ckpt.state_dict()[tracked] == 2 and plain.state_dict()[tracked] == 1


def test_checkpointing_turns_off_and_runs_plainly_without_gradients():
    plain, ckpt, done = _pair("unet", "resnet18")
    assert done and is_checkpointed(ckpt.net.decoder.blocks[0])
    with torch.no_grad():  # validation: nothing to save, the plain forward
        x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
        torch.testing.assert_close(ckpt.eval()(x), plain.eval()(x), rtol=0, atol=0)
    set_grad_checkpointing(ckpt, False)
    assert not any(is_checkpointed(m) for m in ckpt.modules())
    assert not any(hasattr(m, "_bonecomp_bn_hooks") for m in ckpt.modules())


def test_the_recipe_key_checkpoints_the_training_model_not_its_ema(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, tmp_path, **{"train.grad_checkpointing": True, "train.ema": 0.9})
    state = build_state(cfg, torch.device("cpu"), state_mod.Dist(), 4, progress=False)
    assert any(is_checkpointed(m) for m in state.model.modules())
    assert not any(is_checkpointed(m) for m in state.ema.module.modules())  # forwards only
    cfg = tiny_config(tiny_root, tmp_path)
    state = build_state(cfg, torch.device("cpu"), state_mod.Dist(), 4, progress=False)
    assert not any(is_checkpointed(m) for m in state.model.modules())
