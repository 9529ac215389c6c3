"""Model factory: ``create_model(cfg)`` keyed by ``model.arch``, over a registry.

Every architecture is an entry of one registry, used by both ``create_model`` and the
config check (``check_model_config``): ``fcn32s``/``fcn16s``/``fcn8s`` (ours, ``fcn.py``),
and ``unet``, ``unetplusplus``, ``deeplabv3``, ``deeplabv3plus`` and every other
segmentation_models_pytorch architecture. Every model takes images in [0, 1] (3 channels)
and returns one logit per class at the input resolution.

Add an architecture from your own code with one call (then ``model.arch: mynet`` passes
the config check, trains and infers)::

    from bonecomp.models import register_arch

    def build(cfg, classes, encoder_weights):  # cfg: the ModelConfig
        return MyNet(encoder_name=cfg.encoder, encoder_weights=encoder_weights,
                     classes=classes)

    register_arch("mynet", build, output_stride=32)   # or @register_arch("mynet")

The built network is what smp builds (e.g. a ``segmentation_models_pytorch.base.
SegmentationModel`` subclass): an ``encoder`` (an smp encoder, so ``model.encoder_weights``
files load into it) and a ``segmentation_head`` whose last conv with a bias receives the
foreground prior (``model.init_bias``); a net whose prior lives elsewhere says so with an
``output_bias`` property (FCN does).
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import segmentation_models_pytorch as smp
import torch
from torch import nn

from bonecomp.classes import NUM_CLASSES
from bonecomp.config import ConfigError, ModelConfig
from bonecomp.models.encoder_weights import load_encoder_weights, with_imagenet_weights
from bonecomp.models.fcn import FCN, STRIDES
from bonecomp.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (cfg, classes, encoder_weights) -> the network; encoder_weights is what smp's
# ``encoder_weights`` takes: None, "imagenet", or True for a ``tu-`` (timm) encoder.
Builder = Callable[[ModelConfig, int, "str | bool | None"], nn.Module]


@dataclass(frozen=True)
class Arch:
    """A registered architecture: how to build it and the input sides it needs.

    ``output_stride``: input sides must be multiples of it (``data.image_size`` is checked),
    an int or a function of the ``ModelConfig`` (a ViT's patch size for ``dpt``).
    ``check``: optional, run by ``create_model`` before any weights download; raises a
    one-line ``ValueError`` naming the key when this config cannot build the arch.
    """

    name: str
    build: Builder
    output_stride: int | Callable[[ModelConfig], int] = 32
    check: Callable[[ModelConfig], None] | None = None

    def stride(self, cfg: ModelConfig) -> int:
        s = self.output_stride
        return int(s(cfg) if callable(s) else s)


ARCHS: Registry[Arch] = Registry("architecture", "model.arch", fold_case=True)


def register_arch(
    name: str,
    build: Builder | None = None,
    *,
    output_stride: int | Callable[[ModelConfig], int] = 32,
    check: Callable[[ModelConfig], None] | None = None,
    replace: bool = False,
):
    """Register ``build`` as ``model.arch: name`` (case-insensitive); see the module docstring.

    Without ``build`` it is a decorator. A name already registered is refused unless
    ``replace=True``. Returns ``build``.
    """
    if build is None:
        return functools.partial(
            register_arch, name, output_stride=output_stride, check=check, replace=replace
        )
    ARCHS.register(name, Arch(name.lower(), build, output_stride, check), replace=replace)
    return build


def arch_names() -> list[str]:
    """The valid ``model.arch`` values, in registration order."""
    return ARCHS.names()


def get_arch(name: str) -> Arch:
    """The registered architecture; an unknown name is the registry's ``ConfigError``
    naming ``model.arch`` and the valid ones."""
    return ARCHS.get(name)


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
        """The bias added to every logit: where the foreground prior goes (the net's own
        ``output_bias`` if it has one, else the last biased conv of its segmentation head)."""
        own = getattr(self.net, "output_bias", None)
        if isinstance(own, torch.Tensor):
            return own
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
    arch = get_arch(cfg.arch)
    _check_encoder(cfg.encoder)
    if arch.check is not None:  # before any download: an unfit encoder fails with its name
        arch.check(cfg)
    weights = cfg.encoder_weights

    def build(weights: str | None) -> nn.Module:
        # timm ("tu-") encoders take True/None; smp encoders take the weights' name.
        w = (True if weights else None) if cfg.encoder.startswith("tu-") else weights
        return arch.build(cfg, num_classes, w)

    if weights == "imagenet":
        net = with_imagenet_weights(lambda: build(weights="imagenet"), cfg.encoder)
    else:
        net = build(weights=None)
    if weights not in (None, "imagenet"):
        load_encoder_weights(net.encoder, weights)
    model = SegModel(net)
    if cfg.init_bias is not None:
        with torch.no_grad():
            model.output_bias.fill_(cfg.init_bias)
    return model


def check_model_config(cfg: ModelConfig, image_size: int, patch_size: int | None = None) -> None:
    """Check ``model.arch``, ``model.encoder`` and the input sizes without building anything.

    Raises ``ConfigError`` naming the key: an unknown architecture or encoder (listing the
    valid names), or ``data.image_size`` (and ``data.patch_size``, the side training and
    the windows feed) not divisible by the architecture's output stride (32 for every
    encoder at depth 5; a ViT's patch size for ``dpt``).
    """
    arch = get_arch(cfg.arch)
    try:
        _check_encoder(cfg.encoder)
    except ValueError as e:
        raise ConfigError(f"model.encoder: {e}", "model.encoder") from e
    stride = arch.stride(cfg)
    for key, side in (("data.image_size", image_size), ("data.patch_size", patch_size)):
        if side is not None and (side <= 0 or side % stride):
            raise ConfigError(
                f"{key}: {side} is not a multiple of {stride}, the output stride "
                f"of {cfg.arch}/{cfg.encoder}",
                key,
            )


def _vit_patch_stride(cfg: ModelConfig) -> int:
    """A timm ViT's patch size, as its name says (patch16 by default)."""
    m = re.search(r"patch(\d+)", cfg.encoder)
    return int(m.group(1)) if m else 16


def _smp_builder(cls: type[nn.Module]) -> Builder:
    def build(cfg: ModelConfig, classes: int, encoder_weights) -> nn.Module:
        return cls(encoder_name=cfg.encoder, encoder_weights=encoder_weights, classes=classes,
                   **encoder_kwargs(cfg.encoder))  # fmt: skip

    return build


def _fcn_builder(variant: str) -> Builder:
    def build(cfg: ModelConfig, classes: int, encoder_weights) -> nn.Module:
        return FCN(cfg.encoder, encoder_weights, classes, variant, cfg.fcn_upsample,
                   **encoder_kwargs(cfg.encoder))  # fmt: skip

    return build


def _fcn_check(variant: str) -> Callable[[ModelConfig], None]:
    def check(cfg: ModelConfig) -> None:
        with torch.random.fork_rng(devices=[]):  # the model's random init stays the same
            _fcn_encoder(cfg.encoder, variant)

    return check


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
        enc = _get_encoder(name, weights=None)
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


@functools.cache
def _timm_input_size(encoder: str) -> tuple[int | None, bool]:
    """(the only input side timm builds ``encoder`` for, or None when it takes any;
    whether it has timm's ``dynamic_img_size`` switch): a ``tu-`` model with a strict
    ``patch_embed`` (ViT, Swin, BEiT...) asserts its pretrained size in the forward pass.

    Read off the timm model built on the meta device (no weights, no memory, ~0.5 s);
    a model that cannot be built there is not checked (None, False): no refusal on a guess.
    """
    if not encoder.startswith("tu-"):
        return None, False  # smp's own encoders are CNNs or mit_b* (any size)
    import timm

    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = timm.create_model(encoder[3:], pretrained=False)
    except Exception:  # any failure only means: not checked here
        return None, False
    embed = getattr(net, "patch_embed", None)
    side = getattr(embed, "img_size", None)
    if not getattr(embed, "strict_img_size", False) or not side or side[0] != side[1]:
        return None, False
    return int(side[0]), hasattr(net, "dynamic_img_size")


def encoder_kwargs(encoder: str) -> dict:
    """What the built-in builders pass to timm for ``encoder``: ``dynamic_img_size=True``
    for a fixed-size model that has it (ViT, DeiT, EVA, Swin), so it takes any input side
    (position embeddings resampled, Swin's masks built per forward) and the recipe's size,
    TTA scales and tiles all work; state dicts and weights are the same either way."""
    side, dynamic = _timm_input_size(encoder)
    return {"dynamic_img_size": True} if side is not None and dynamic else {}


def fixed_input_side(cfg: ModelConfig) -> int | None:
    """The only input side ``cfg``'s network takes (None: any multiple of its stride):
    a fixed-size timm encoder without ``dynamic_img_size``, or one a registered
    (non built-in) architecture builds without passing it."""
    side, dynamic = _timm_input_size(cfg.encoder)
    builtin = get_arch(cfg.arch).build.__module__ == __name__
    return None if side is None or (dynamic and builtin) else side


def check_input_side(cfg: ModelConfig, key: str, side: int) -> None:
    """Raise ``ConfigError`` naming ``key`` when it gives the network a ``side`` px input
    that a fixed-size encoder cannot take (the forward pass would assert)."""
    fixed = fixed_input_side(cfg)
    if fixed is not None and side != fixed:
        raise ConfigError(
            f"{key} gives the network {side}x{side} inputs, but model.encoder {cfg.encoder!r} "
            f"takes {fixed}x{fixed} only (timm builds it at that size, without "
            f"dynamic_img_size): set {key} to give {fixed}, or use an encoder that takes any "
            "size (a CNN, tu-swin_*, tu-vit_*)",
            key,
        )


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


for _variant in STRIDES:
    register_arch(_variant, _fcn_builder(_variant), check=_fcn_check(_variant))
_MAIN_SMP = ("unet", "unetplusplus", "deeplabv3", "deeplabv3plus")
for _name in (*_MAIN_SMP, *sorted(set(smp.MODEL_ARCHITECTURES_MAPPING) - set(_MAIN_SMP))):
    register_arch(
        _name,
        _smp_builder(smp.MODEL_ARCHITECTURES_MAPPING[_name]),
        output_stride=_vit_patch_stride if _name == "dpt" else 32,
    )
