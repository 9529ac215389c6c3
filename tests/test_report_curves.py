"""The report's training curves take every validation column summary.csv holds."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bonecomp.report import curves_figure


def test_every_val_column_is_a_curve():
    nan = np.nan
    summary = pd.DataFrame(
        {
            "epoch": [0, 1, 2],
            "loss": [0.9, 0.7, 0.6],
            "loss_bce": [0.5, 0.4, 0.3],
            "val_loss": [nan, 0.8, 0.7],
            "val_dice": [nan, 0.4, 0.5],
            "val_worst_dice": [nan, 0.1, 0.2],  # a registered metric: no edit of the report
            "lr": [1e-3, 1e-3, 1e-4],
        }
    )
    losses, scores, _ = curves_figure(summary, "fold 0").axes
    assert sorted(line.get_label() for line in losses.get_lines()) == [
        "loss",
        "loss_bce",
        "val_loss",
    ]
    assert [line.get_label() for line in scores.get_lines()] == ["val_dice", "val_worst_dice"]
    assert scores.get_lines()[1].get_ydata().tolist() == [0.1, 0.2]
