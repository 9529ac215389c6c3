"""Exact sparse upsample + threshold equals the dense definition bit for bit."""

from __future__ import annotations

import pytest
import torch

from bonecomp import rle
from bonecomp.inference.postprocess import upsample_threshold
from bonecomp.testing import reference_masks, torch_threads


def _cases():
    g = torch.Generator().manual_seed(0)
    for i, (h, H) in enumerate([(64, 256), (100, 300), (77, 256), (128, 512), (96, 96), (50, 37)]):
        x = torch.randn(4, h, h + 3, generator=g) * 4 - 2
        yield f"random{i}", x, (H, H + 5)
    x = torch.randn(3, 64, 64, generator=g)
    near = torch.rand(x.shape, generator=g) < 0.4
    x = torch.where(near, torch.randn(x.shape, generator=g) * 1e-7, x)  # within 1e-7 of 0
    yield "near-threshold", x, (256, 256)
    x = torch.full((3, 48, 48), -6.0)
    x[0, :4] = 6  # touches the top border
    x[1, :, -2:] = 6  # right border
    x[2] = 6  # everything
    yield "border", x, (192, 192)
    yield "empty", torch.full((2, 32, 32), -9.0), (128, 128)


@pytest.fixture
def threads(request):
    """torch's thread count for one test: its CPU upsample rounds a multi-channel call
    differently with one thread (as under pytest-xdist) than with several."""
    with torch_threads(request.param):
        yield request.param


@pytest.mark.parametrize(
    "name, x, out_hw", list(_cases()), ids=lambda v: v if isinstance(v, str) else ""
)
@pytest.mark.parametrize("logits", [True, False])
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_equals_dense_reference(name, x, out_hw, logits, threads):
    ts = [0.5, 0.3, 0.8, 0.5][: x.shape[0]]
    if not logits:
        x = torch.sigmoid(x)
        if name == "near-threshold":  # probabilities within 1e-7 of the thresholds
            g = torch.Generator().manual_seed(1)
            t = torch.tensor(ts)[:, None, None]
            near = torch.rand(x.shape, generator=g) < 0.4
            x = torch.where(near, t + torch.randn(x.shape, generator=g) * 1e-7, x)
    sparse = upsample_threshold(x, out_hw, ts, logits=logits)
    ref = reference_masks(x, out_hw, ts, logits=logits)
    assert torch.equal(sparse.dense(), ref)
    strings = sparse.rle()
    assert strings == [rle.encode(m) for m in ref.numpy()]


def test_threshold_moves_the_boundary():
    x = torch.linspace(-4, 4, 64).repeat(1, 32, 1)  # logits rising left to right
    low = upsample_threshold(x, (128, 256), 0.2).masks[0].area
    mid = upsample_threshold(x, (128, 256), 0.5).masks[0].area
    high = upsample_threshold(x, (128, 256), 0.9).masks[0].area
    assert low > mid > high > 0


def test_half_precision_input_is_upcast():
    x = (torch.randn(2, 40, 40) * 3).half()
    got = upsample_threshold(x, (160, 160)).dense()
    assert torch.equal(got, reference_masks(x.float(), (160, 160)))


def test_bad_thresholds_rejected():
    with pytest.raises(ValueError, match="thresholds"):
        upsample_threshold(torch.zeros(2, 8, 8), (16, 16), [0.5])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        upsample_threshold(torch.zeros(1, 8, 8), (16, 16), 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cuda_reference():
    x = torch.randn(5, 128, 128, device="cuda") * 4
    sparse = upsample_threshold(x, (512, 512))
    ref = reference_masks(x, (512, 512))
    assert torch.equal(sparse.dense(), ref)
    assert sparse.rle() == [rle.encode(m) for m in ref.cpu().numpy()]
