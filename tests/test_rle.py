"""RLE: byte-identical to the classic definition; malformed input gives clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bonecomp import rle
from bonecomp.testing import classic_encode as classic

masks = st.tuples(st.integers(1, 40), st.integers(1, 40)).flatmap(
    lambda hw: arrays(np.bool_, hw, elements=st.booleans())
)


@settings(max_examples=300, deadline=None)
@given(masks)
def test_encode_equals_classic(mask):
    assert rle.encode(mask) == classic(mask)
    assert rle.encode(mask.astype(np.uint8)) == classic(mask)


@settings(max_examples=200, deadline=None)
@given(masks)
def test_round_trip(mask):
    assert np.array_equal(rle.decode(rle.encode(mask), mask.shape), mask)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5).flatmap(lambda c: arrays(np.bool_, (c, 8, 9), elements=st.booleans())))
def test_encode_many_equals_encode(stack):
    assert rle.encode_many(stack) == [classic(m) for m in stack]


@pytest.mark.parametrize(
    "name, build",
    [
        ("empty", lambda m: m),
        ("full", lambda m: m | True),
        ("first pixel", lambda m: _set(m, 0, 0)),
        ("last pixel", lambda m: _set(m, -1, -1)),
        ("wraps rows", lambda m: _row_end_and_next_start(m)),
        ("one-pixel runs", lambda m: _checker(m)),
    ],
)
def test_edge_cases(name, build):
    for shape in [(64, 64), (7, 13), (1, 1), (2048, 16)]:
        mask = build(np.zeros(shape, bool))
        assert rle.encode(mask) == classic(mask), name
        assert rle.encode_many(mask[None])[0] == classic(mask), name
        assert np.array_equal(rle.decode(rle.encode(mask), shape), mask), name


def test_large_random_and_many_runs():
    rng = np.random.default_rng(0)
    stack = rng.random((3, 256, 256)) < 0.5  # far more runs than the kernel's buffer
    assert rle.encode_many(stack) == [classic(m) for m in stack]
    noisy_blocks = np.zeros((2, 512, 512), bool)
    noisy_blocks[:, 100:300, 50:400] = True
    noisy_blocks[0, 150:160, 60:70] = False
    assert rle.encode_many(noisy_blocks) == [classic(m) for m in noisy_blocks]


def test_empty_and_nan_decode_to_empty():
    for value in ["", "   ", float("nan"), None]:
        assert not rle.decode(value, (4, 5)).any()
    assert rle.encode(np.zeros((3, 3), bool)) == ""


def test_other_dtypes_and_views():
    m = np.zeros((10, 12), np.int64)
    m[2:4, 3:9] = 7
    assert rle.encode(m) == classic(m != 0)
    u8 = (m != 0).astype(np.uint8) * 255  # values other than 1 are still foreground
    assert rle.encode(u8) == classic(m != 0)
    big = np.zeros((3, 10, 13), bool)
    big[1, 2:5, 3:11] = True
    assert rle.encode(big[1, :, 1:]) == classic(big[1, :, 1:])  # non-contiguous view


@settings(max_examples=150, deadline=None)
@given(masks, st.integers(0, 5), st.integers(0, 5))
def test_crop_to_runs_equals_full(mask, dy, dx):
    H, W = mask.shape[0] + dy + 3, mask.shape[1] + dx + 2
    full = np.zeros((H, W), bool)
    full[dy : dy + mask.shape[0], dx : dx + mask.shape[1]] = mask
    assert rle.runs_to_string(*rle.crop_to_runs(mask, dy, dx, (H, W))) == classic(full)
    full_width = np.zeros((mask.shape[0] + dy, mask.shape[1]), bool)
    full_width[dy:] = mask  # crop spanning the whole width: runs wrap rows
    got = rle.runs_to_string(*rle.crop_to_runs(mask, dy, 0, full_width.shape))
    assert got == classic(full_width)


@settings(max_examples=150, deadline=None)
@given(masks, masks)
def test_runs_overlap_counts_intersection(a, b):
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    a, b = a[:h, :w], b[:h, :w]
    assert rle.runs_overlap(rle.mask_to_runs(a), rle.mask_to_runs(b)) == int((a & b).sum())


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("1 2 3", "odd number"),
        ("1 2 x 4", "non-integer"),
        ("1.5 2", "non-integer"),
        ("0 2", "not positive"),
        ("-3 2", "not positive"),
        ("1 0", "length 0 is not positive"),
        ("5 1 3 1", "not increasing"),
        ("5 1 5 1", "not increasing"),
        ("1 5 3 2", "overlap"),
        ("19 3", "past the end"),
        ("99999999999999999999 1", "out of range"),
        ("+1 2", "non-integer"),
        ("1_0 2", "non-integer"),
    ],
)
def test_malformed_rle_errors(text, fragment):
    with pytest.raises(rle.RLEError, match=fragment):
        rle.decode(text, (4, 5))


def test_touching_runs_decode():
    assert rle.decode("1 2 3 2", (1, 5)).tolist() == [[True, True, True, True, False]]


def _set(m, y, x):
    m[y, x] = True
    return m


def _row_end_and_next_start(m):
    if m.shape[0] > 1:
        m[0, -2:] = True
        m[1, :2] = True
    return m


def _checker(m):
    m[::2, ::2] = True
    return m
