"""The rule the benchmarks' tables (and so docs/techniques.md) use to call a difference a
gain: only beyond the reference's range over training seeds. Expected words are written
by hand from the figures given, not taken from the code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import appearance
import techniques


@pytest.mark.parametrize(
    "delta, noise, word",
    [(0.02, 0.01, "gain"), (-0.02, 0.01, "loss"), (0.01, 0.01, "within noise"),
     (-0.005, 0.01, "within noise"), (0.3, None, "no spread measured")],
)  # fmt: skip
def test_a_delta_is_a_gain_or_a_loss_only_beyond_the_spread(delta, noise, word):
    assert techniques.verdict(delta, noise) == word


def test_the_spread_is_the_range_over_seeds():
    assert techniques.spread([0.5]) is None
    assert techniques.spread([0.60, 0.65, 0.62]) == pytest.approx(0.05)


def test_the_appearance_table_words_the_gap_and_the_cross_dice_by_the_presets_ranges():
    """Preset gaps 0.020, 0.015, 0.020 (range 0.005), cross 0.580, 0.605, 0.570 (range
    0.035): a set with gap 0.005 and cross 0.545 closes the gap (-0.0133) but loses cross
    Dice (-0.0400), both beyond; one a hair off the preset is within noise on both."""
    S = appearance.Scores
    preset = [S(0.60, 0.58), S(0.62, 0.605), S(0.59, 0.57)]
    rows = appearance.table(
        {"preset": preset, "mix": [S(0.55, 0.545)] * 3,
         "near": [S(s.same + 0.001, s.cross + 0.001) for s in preset]}
    ).splitlines()  # fmt: skip
    by_name = {line.split(" | ")[0].lstrip("| "): line for line in rows[2:]}
    assert "reference: range over seeds 0.0050" in by_name["preset"]
    assert "reference: range over seeds 0.0350" in by_name["preset"]
    mix = by_name["mix"]
    assert "| -0.0133 | closes the gap (beyond the spread) |" in mix
    assert "| -0.0400 | loss (beyond the spread) |" in mix
    assert by_name["near"].endswith("| within noise | +0.0010 | within noise |")
