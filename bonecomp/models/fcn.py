"""FCN-32s / 16s / 8s (Long et al.) on any smp or timm encoder, built like an smp model.

``FCN`` is an ``smp.base.SegmentationModel``: an smp encoder, a decoder fed the encoder's
channel list, and a segmentation head. The decoder scores the stride-8/16/32 features
with 1x1 convs, upsamples the coarsest score and adds it to the next finer one, and
upsamples the sum to the input size (bilinear, or learned transposed convolutions
initialised to bilinear as in the paper). The score convs are the classifier, so the
head is the identity and the prior bias is the coarsest score's (``FCN.output_bias``).
State-dict keys (``encoder.*``, ``decoder.score.*``, ``decoder.up.*``) are those of the
earlier stand-alone FCN, so old checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationModel
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn

from bonecomp.config import FcnUpsample

STRIDES = {"fcn32s": (32,), "fcn16s": (32, 16), "fcn8s": (32, 16, 8)}


def bilinear_kernel(channels: int, factor: int) -> torch.Tensor:
    """Per-channel bilinear weights for a transposed conv upsampling by ``factor``."""
    size = 2 * factor - factor % 2
    center = (size - 1) / 2 if size % 2 else factor - 0.5
    og = torch.arange(size, dtype=torch.float32)
    filt = 1 - (og - center).abs() / factor
    kernel = filt[:, None] * filt[None, :]
    weight = torch.zeros(channels, 1, size, size)
    weight[:, 0] = kernel
    return weight


class LearnedUpsample(nn.Module):
    """Depthwise transposed conv by an integer factor, initialised to bilinear."""

    def __init__(self, channels: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.conv = nn.ConvTranspose2d(
            channels,
            channels,
            2 * factor - factor % 2,
            stride=factor,
            padding=(factor + 1) // 2 - 1 if factor > 1 else 0,
            groups=channels,
            bias=False,
        )
        with torch.no_grad():
            self.conv.weight.copy_(bilinear_kernel(channels, factor))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = self.conv(x)
        if y.shape[-2:] != size:  # odd sizes: crop or pad to the target
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y


class FCNDecoder(nn.Module):
    """Score convs on the chosen strides, fused coarse to fine by addition.

    ``encoder_channels`` is the smp encoder's ``out_channels`` (strides 1, 2, 4, ..., 32);
    ``forward`` takes its feature list (the first is the input: it gives the output size).
    """

    def __init__(
        self, encoder_channels: Sequence[int], num_classes: int, variant: str, upsample: str
    ) -> None:
        super().__init__()
        if variant not in STRIDES:
            raise ValueError(f"unknown FCN variant {variant!r}; valid: {sorted(STRIDES)}")
        if upsample not in get_args(FcnUpsample):
            raise ValueError(f"fcn_upsample must be 'bilinear' or 'learned', got {upsample!r}")
        channels = dict(zip((2**i for i in range(6)), encoder_channels, strict=True))
        self.strides = STRIDES[variant]
        self.score = nn.ModuleDict(
            {str(s): nn.Conv2d(channels[s], num_classes, 1) for s in self.strides}
        )
        self.learned = upsample == "learned"
        if self.learned:
            # from each stride to the next finer one, then from the finest to the input
            steps = zip(self.strides, self.strides[1:], strict=False)
            factors = [a // b for a, b in steps] + [self.strides[-1]]
            self.up = nn.ModuleList(LearnedUpsample(num_classes, f) for f in factors)
        for i, conv in enumerate(self.score.values()):
            nn.init.zeros_(conv.weight) if i else nn.init.kaiming_normal_(conv.weight)
            nn.init.zeros_(conv.bias)

    @property
    def output_bias(self) -> torch.Tensor:
        """The bias that ends up in every logit (the coarsest score's)."""
        return self.score[str(self.strides[0])].bias

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        by_stride = {2**i: f for i, f in enumerate(features)}
        out = None
        for i, s in enumerate(self.strides):
            score = self.score[str(s)](by_stride[s])
            out = score if out is None else self._up(out, i - 1, score.shape[-2:]) + score
        return self._up(out, len(self.strides) - 1, features[0].shape[-2:])

    def _up(self, x: torch.Tensor, i: int, size: tuple[int, int]) -> torch.Tensor:
        if self.learned:
            return self.up[i](x, tuple(size))
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class FCN(SegmentationModel):
    """An smp-style FCN: ``get_encoder`` (smp names or ``tu-<timm name>``) + ``FCNDecoder``
    + an identity head; the arguments are smp's (``encoder_name``, ``encoder_weights``,
    ``classes``) plus the ``variant`` (fcn32s/16s/8s) and the ``upsample`` mode;
    ``encoder_kwargs`` go to timm for a ``tu-`` encoder (as smp models' ``**kwargs`` do)."""

    requires_divisible_input_shape = False  # every score is resized to the next size

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_weights: str | bool | None = None,
        classes: int = 1,
        variant: str = "fcn8s",
        upsample: str = "bilinear",
        in_channels: int = 3,
        **encoder_kwargs,
    ) -> None:
        super().__init__()
        self.encoder = get_encoder(encoder_name, in_channels=in_channels, depth=5,
                                   weights=encoder_weights, **encoder_kwargs)  # fmt: skip
        self.decoder = FCNDecoder(self.encoder.out_channels, classes, variant, upsample)
        self.segmentation_head = nn.Identity()  # the decoder's score convs classify
        self.classification_head = None
        self.name = f"{variant}-{encoder_name}"

    @property
    def output_bias(self) -> torch.Tensor:
        """The bias in every logit (``SegModel.output_bias`` reads it): the coarsest score's."""
        return self.decoder.output_bias
