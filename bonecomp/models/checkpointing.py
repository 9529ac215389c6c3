"""Gradient checkpointing (``train.grad_checkpointing``): recompute, do not keep.

A checkpointed block keeps only its inputs for the backward pass and runs its forward
again there, so the activations inside it are alive one block at a time: less memory,
about one more forward of those blocks per step. Applied to

* the encoder: a timm (``tu-``) encoder through timm's own ``set_grad_checkpointing``
  (each model picks its blocks); an smp encoder (``resnet34``, ``efficientnet-b4``...)
  by checkpointing each child of its block containers (ResNet's residual blocks,
  EfficientNet's MBConv blocks);
* the decoder: each of ``decoder.blocks`` where it has them (U-Net, U-Net++: the
  decoder's blocks at high resolution hold most of the activations there), else each
  of the decoder's own child modules with weights (DeepLabV3+'s ASPP and blocks; FCN's
  1x1 score convs have nothing worth recomputing).

Checkpoints are ``torch.utils.checkpoint`` non-reentrant ones, with the random state
preserved (drop-path draws the same mask again), so the gradients are those of the plain
model. BatchNorm layers would update their running statistics a second time when their
forward is recomputed (the same batch statistics again, moving the running averages
twice as far); while the autograd engine runs a backward pass (the only place a
forward is recomputed) a pre-hook sets their momentum to 0 and the batch count back, so
the running statistics are those of the plain model too. The module tree and the state
dict do not change (the forward of each checkpointed module is wrapped on the instance),
so checkpoints load either way.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_WRAPPED = "_bonecomp_checkpointed"
_HOOKS = "_bonecomp_bn_hooks"


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> list[str]:
    """Turn checkpointing of ``model``'s encoder and decoder on or off (a ``SegModel`` or
    an smp-style net with ``encoder`` and ``decoder``); returns what was checkpointed,
    as dotted module names (``encoder`` alone for a timm encoder: timm picks its blocks)."""
    net = getattr(model, "net", model)
    done: list[str] = []
    encoder = getattr(net, "encoder", None)
    timm_model = getattr(encoder, "model", None)
    if timm_model is not None and hasattr(timm_model, "set_grad_checkpointing"):
        timm_model.set_grad_checkpointing(enable)
        done.append("encoder (timm set_grad_checkpointing)")
    elif encoder is not None:
        done += _wrap_all(encoder, "encoder", _encoder_blocks(encoder), enable)
    decoder = getattr(net, "decoder", None)
    if decoder is not None:
        done += _wrap_all(decoder, "decoder", _decoder_blocks(decoder), enable)
    _guard_batchnorm(model, enable and bool(done))
    return done


def is_checkpointed(module: nn.Module) -> bool:
    return hasattr(module, _WRAPPED)


def _encoder_blocks(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children of the encoder's block containers (Sequential / ModuleList with two
    or more modules that hold weights): ResNet's ``layer1..4`` blocks, EfficientNet's
    ``_blocks``."""
    out = []
    for name, child in encoder.named_children():
        if isinstance(child, nn.Sequential | nn.ModuleList) and len(child) >= 2:
            out += [(f"{name}.{n}", m) for n, m in child.named_children() if _has_weights(m)]
    return out


def _decoder_blocks(decoder: nn.Module) -> list[tuple[str, nn.Module]]:
    blocks = getattr(decoder, "blocks", None)
    if isinstance(blocks, nn.ModuleList | nn.ModuleDict):
        return [(f"blocks.{n}", m) for n, m in blocks.named_children() if _has_weights(m)]
    return [
        (n, m)
        for n, m in decoder.named_children()
        if _has_weights(m) and not isinstance(m, nn.ModuleList | nn.ModuleDict)
    ]


def _has_weights(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _wrap_all(
    parent: nn.Module, prefix: str, blocks: list[tuple[str, nn.Module]], enable: bool
) -> list[str]:
    done = []
    for name, block in blocks:
        if enable and not is_checkpointed(block):
            plain = block.forward
            block.forward = functools.partial(_checkpointed, plain)
            setattr(block, _WRAPPED, plain)
        elif not enable and is_checkpointed(block):
            del block.forward  # the class's forward again
            delattr(block, _WRAPPED)
        if enable:
            done.append(f"{prefix}.{name}")
    return done


def _checkpointed(forward, *args, **kwargs):
    """``forward`` under a non-reentrant checkpoint when gradients are recorded (in
    ``no_grad`` there is nothing to save, so it runs as it is)."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def _guard_batchnorm(model: nn.Module, enable: bool) -> None:
    """BatchNorm running statistics are updated by the forward only, not again by its
    recomputation in the backward pass."""
    for m in model.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        hooks = getattr(m, _HOOKS, None)
        if enable and hooks is None:
            setattr(m, _HOOKS, (
                m.register_forward_pre_hook(_freeze_if_recomputing),
                m.register_forward_hook(_unfreeze, always_call=True),
            ))  # fmt: skip
        elif not enable and hooks is not None:
            for h in hooks:
                h.remove()
            delattr(m, _HOOKS)


_FROZEN = "_bonecomp_frozen_momentum"


def _freeze_if_recomputing(m: nn.Module, args) -> None:
    if m.training and m.track_running_stats and torch._C._current_graph_task_id() != -1:
        # Momentum 0 keeps the running statistics as they are (1 x old + 0 x batch);
        # the operator and what it saves for the backward are the forward's, as the
        # checkpoint's recomputation check wants.
        setattr(m, _FROZEN, m.momentum)
        m.momentum = 0.0


def _unfreeze(m: nn.Module, args, output) -> None:
    if hasattr(m, _FROZEN):
        m.momentum = getattr(m, _FROZEN)
        delattr(m, _FROZEN)
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.sub_(1)  # counted by the forward already
