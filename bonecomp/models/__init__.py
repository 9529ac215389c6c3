"""Model factory: ``create_model(cfg)`` keyed by ``model.arch``.

``fcn32s``/``fcn16s``/``fcn8s`` are ours (``fcn.py``); ``unet``, ``unetplusplus``,
``deeplabv3``, ``deeplabv3plus`` and any other segmentation_models_pytorch architecture
come from smp. Every model takes images in [0, 1] (3 channels) and returns one logit per
class at the input resolution (sides divisible by 32).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import segmentation_models_pytorch as smp
import torch
from torch import nn

from bonecomp.classes import NUM_CLASSES
from bonecomp.config import ConfigError, ModelConfig
from bonecomp.models.encoder_weights import load_encoder_weights, with_imagenet_weights
from bonecomp.models.fcn import FCN, STRIDES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SMP = {
    "unet": smp.Unet,
    "unetplusplus": smp.UnetPlusPlus,
    "deeplabv3": smp.DeepLabV3,
    "deeplabv3plus": smp.DeepLabV3Plus,
}
# Any other smp architecture passes through by its lower-case class name.
_SMP_ALL = {**smp.MODEL_ARCHITECTURES_MAPPING, **_SMP}
ARCHS: tuple[str, ...] = (*STRIDES, *_SMP, *sorted(set(_SMP_ALL) - set(_SMP)))


class SegModel(nn.Module):
    """Normalises [0, 1] input with ImageNet statistics, then runs the network.

    Keeping normalisation inside the model makes a checkpoint self-describing: inference
    feeds images in [0, 1] whatever the encoder.
    """

    def __init__(self, net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    @property
    def output_bias(self) -> torch.Tensor:
        """The bias added to every logit: where the foreground prior goes."""
        if isinstance(self.net, FCN):
            return self.net.decoder.output_bias
        convs = [
            m
            for m in self.net.segmentation_head.modules()
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d) and m.bias is not None
        ]
        if not convs:
            raise ValueError(
                f"{type(self.net).__name__}: no output conv with a bias; set model.init_bias=null"
            )
        return convs[-1].bias


def create_model(cfg: ModelConfig, num_classes: int = NUM_CLASSES) -> SegModel:
    """Build the configured model; an unknown arch or encoder lists the valid names."""
    arch = cfg.arch.lower()
    if arch not in ARCHS:
        raise ValueError(f"unknown model.arch {cfg.arch!r}; valid: {list(ARCHS)}")
    _check_encoder(cfg.encoder)
    weights = cfg.encoder_weights
    pretrained = weights == "imagenet"
    build = _builder(arch, cfg, num_classes)
    net = (
        with_imagenet_weights(lambda: build("imagenet"), cfg.encoder) if pretrained else build(None)
    )
    if weights not in (None, "imagenet"):
        load_encoder_weights(net.encoder, weights)
    model = SegModel(net)
    if cfg.init_bias is not None:
        with torch.no_grad():
            model.output_bias.fill_(cfg.init_bias)
    return model


def check_model_config(cfg: ModelConfig, image_size: int) -> None:
    """Check ``model.arch``, ``model.encoder`` and the input size without building anything.

    Raises ``ConfigError`` naming the key: an unknown architecture or encoder (listing the
    valid names), or ``data.image_size`` not divisible by the network's output stride
    (32 for every encoder at depth 5; a ViT's patch size for ``dpt``).
    """
    arch = cfg.arch.lower()
    if arch not in ARCHS:
        raise ConfigError(f"model.arch: unknown {cfg.arch!r}; valid: {list(ARCHS)}", "model.arch")
    try:
        _check_encoder(cfg.encoder)
    except ValueError as e:
        raise ConfigError(f"model.encoder: {e}", "model.encoder") from e
    stride = _output_stride(arch, cfg.encoder)
    if image_size <= 0 or image_size % stride:
        raise ConfigError(
            f"data.image_size: {image_size} is not a multiple of {stride}, the output stride "
            f"of {cfg.arch}/{cfg.encoder}",
            "data.image_size",
        )


def _output_stride(arch: str, encoder: str) -> int:
    if arch == "dpt":  # a timm ViT: the patch size, as its name says (patch16 by default)
        m = re.search(r"patch(\d+)", encoder)
        return int(m.group(1)) if m else 16
    return 32


def _builder(arch: str, cfg: ModelConfig, num_classes: int) -> Callable[[str | None], nn.Module]:
    # FCN: check (and build, without weights) the encoder first, so an encoder the head
    # cannot take fails here with its name, not as a weights-download problem.
    fcn_encoder = _fcn_encoder(cfg.encoder, arch) if arch in STRIDES else None

    def build(weights: str | None) -> nn.Module:
        # timm ("tu-") encoders take True/None; smp encoders take the weights' name.
        w = (True if weights else None) if cfg.encoder.startswith("tu-") else weights
        if arch in STRIDES:
            enc = fcn_encoder if w is None else _get_encoder(cfg.encoder, w)
            return FCN(enc, num_classes, arch, cfg.fcn_upsample)
        return _SMP_ALL[arch](encoder_name=cfg.encoder, encoder_weights=w, classes=num_classes)

    return build


def _get_encoder(name: str, weights) -> nn.Module:
    return smp.encoders.get_encoder(name, in_channels=3, depth=5, weights=weights)


def _fcn_encoder(name: str, arch: str) -> nn.Module:
    """The encoder (no weights) if it gives the features ``arch`` scores: strides 8/16/32
    with channels (CNNs, hierarchical transformers: swin, convnext, mit_b*); plain ViTs and
    other single-scale encoders raise a ValueError naming model.encoder."""
    need = STRIDES[arch]
    advice = (
        f"model.encoder {name!r} cannot feed model.arch={arch}: it needs features at "
        f"strides {sorted(need)}; use a CNN or hierarchical encoder (resnet*, efficientnet-*, "
        "tu-convnext_*, tu-swin_*, mit_b*) or another model.arch"
    )
    try:
        enc = _get_encoder(name, None)
    except ValueError as e:  # smp: "Unsupported model downsampling pattern" (ViT, DeiT...)
        raise ValueError(f"{advice} ({e})") from None
    chans = list(enc.out_channels)
    by_stride = dict(zip((2**i for i in range(len(chans))), chans, strict=True))
    if len(chans) != 6 or getattr(enc, "output_stride", 32) != 32:
        raise ValueError(f"{advice} (it has {len(chans) - 1} stages, output stride "
                         f"{getattr(enc, 'output_stride', '?')})")  # fmt: skip
    missing = [s for s in need if by_stride.get(s, 0) <= 0]
    if missing:
        raise ValueError(f"{advice} (no features at strides {missing})")
    return enc


def _check_encoder(name: str) -> None:
    if name.startswith("tu-"):
        import timm

        model = name[3:]
        arch, _, tag = model.partition(".")  # timm names may carry a weights tag
        if not timm.is_model(arch):
            raise ValueError(
                f"unknown timm encoder model.encoder={name!r} (see timm.list_models())"
            )
        if tag and not timm.list_pretrained(model):
            tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
            raise ValueError(
                f"model.encoder={name!r}: timm has no weights tagged {tag!r} for {arch}; "
                f"known tags: {tags}"
            )
        return
    valid = smp.encoders.get_encoder_names()
    if name not in valid:
        raise ValueError(
            f"unknown model.encoder {name!r}; valid smp encoders: {valid}, "
            "or any timm model as 'tu-<name>'"
        )
