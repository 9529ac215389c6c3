"""FCN-32s / 16s / 8s (Long et al.) on any smp or timm encoder.

The decoder is a pure module fed the encoder's stride-8/16/32 features: each is scored
with a 1x1 conv, the coarsest score is upsampled and added to the next finer one, and
the sum is upsampled to the input size. Upsampling is bilinear, or learned transposed
convolutions initialised to bilinear as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
    """Score convs on the chosen strides, fused coarse to fine by addition."""

    def __init__(
        self, channels: dict[int, int], num_classes: int, variant: str, upsample: str
    ) -> None:
        super().__init__()
        if variant not in STRIDES:
            raise ValueError(f"unknown FCN variant {variant!r}; valid: {sorted(STRIDES)}")
        if upsample not in ("bilinear", "learned"):
            raise ValueError(f"fcn_upsample must be 'bilinear' or 'learned', got {upsample!r}")
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

    def forward(self, feats: dict[int, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        out = None
        for i, s in enumerate(self.strides):
            score = self.score[str(s)](feats[s])
            out = score if out is None else self._up(out, i - 1, score.shape[-2:]) + score
        return self._up(out, len(self.strides) - 1, size)

    def _up(self, x: torch.Tensor, i: int, size: tuple[int, int]) -> torch.Tensor:
        if self.learned:
            return self.up[i](x, tuple(size))
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class FCN(nn.Module):
    """Encoder (smp ``get_encoder``: smp names or ``tu-<timm name>``) + FCN decoder."""

    def __init__(self, encoder: nn.Module, num_classes: int, variant: str, upsample: str):
        super().__init__()
        self.encoder = encoder
        # smp encoders return features at strides 1, 2, 4, ..., 32 with these channels.
        chans = dict(zip((2**i for i in range(6)), encoder.out_channels, strict=True))
        self.decoder = FCNDecoder(chans, num_classes, variant, upsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        by_stride = {2**i: f for i, f in enumerate(feats)}
        return self.decoder(by_stride, x.shape[-2:])
