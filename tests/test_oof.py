"""The one reader of a run's out-of-fold maps: the maps np.load gives, row by row, the
crop boxes with their rows, and one line naming the file for each kind of damage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from bonecomp.data.carpal_box import BOX_COLUMNS
from bonecomp.inference.oof import by_image, has_oof, open_oof
from bonecomp.runs import RunDir, RunError

C, S = 29, 8


def _write_run(tmp_path, n=3, boxes=False, experiment="exp", seed=0) -> RunDir:
    """A fold folder as training leaves it: oof.npy (N, C, S, S) float16 + oof_index.csv,
    its rows listed out of order (the ``row`` column, not the position, finds a map)."""
    run = RunDir(tmp_path / experiment / "fold0")
    run.path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    np.save(run.oof, rng.random((n, C, S, S)).astype(np.float16))
    order = np.arange(n)[::-1]
    index = pd.DataFrame(
        {
            "row": order,
            "rel": [f"ID{i:03d}/img{i}.png" for i in order],
            "patient": [f"ID{i:03d}" for i in order],
            "name": [f"img{i}.png" for i in order],
            "src_h": [100 + i for i in order],
            "src_w": [90 + i for i in order],
        }
    )
    if boxes:
        for k, col in enumerate(BOX_COLUMNS):
            index[col] = [10 * i + k for i in order]
    index.to_csv(run.oof_index, index=False)
    return run


def test_each_row_gets_the_map_np_load_gives(tmp_path):
    run = _write_run(tmp_path)
    oof = open_oof(run)
    full = np.load(run.oof)
    index = pd.read_csv(run.oof_index)
    assert isinstance(oof.array, np.memmap)  # nothing read until a map is asked for
    assert oof.size == S and not oof.crop
    assert [r.rel for r in oof.rows] == index["rel"].tolist()  # index order
    for r, (_, want) in zip(oof.rows, index.iterrows(), strict=True):
        assert r.row == want["row"] and r.hw == (want["src_h"], want["src_w"]) and r.box is None
        got = oof.probs(r)
        assert got.dtype == torch.float32 and got.shape == (C, S, S)
        assert torch.equal(got, torch.from_numpy(full[want["row"]].astype(np.float32)))
        assert torch.equal(oof.probs(r.row), got)


def test_a_crop_runs_boxes_come_with_its_rows(tmp_path):
    crop = _write_run(tmp_path, boxes=True, experiment="carp")
    oof = open_oof(crop, crop=True)
    assert oof.crop
    index = pd.read_csv(crop.oof_index)
    for r, (_, want) in zip(oof.rows, index.iterrows(), strict=True):
        assert r.box == tuple(int(want[c]) for c in BOX_COLUMNS)
    with pytest.raises(RunError, match="is a crop experiment"):
        open_oof(crop, crop=False)
    whole = _write_run(tmp_path, experiment="whole")
    with pytest.raises(RunError, match=r"oof_index\.csv has no crop boxes"):
        open_oof(whole, crop=True)


def test_rows_of_several_runs_group_by_image(tmp_path):
    a, b = _write_run(tmp_path, 3, experiment="a"), _write_run(tmp_path, 2, experiment="b")
    oofs = [open_oof(a), open_oof(b, crop=False)]
    grouped = by_image(oofs)
    assert sorted(grouped) == [f"ID{i:03d}/img{i}.png" for i in range(3)]
    assert [o.run for o, _ in grouped["ID000/img0.png"]] == [a, b]
    assert [o.run for o, _ in grouped["ID002/img2.png"]] == [a]


def _truncate(run):
    data = run.oof.read_bytes()
    run.oof.write_bytes(data[: len(data) // 2])


def _garbage(run):
    run.oof.write_bytes(b"not a numpy file at all" * 10)


def _wrong_classes(run):
    np.save(run.oof, np.zeros((3, C - 1, S, S), np.float16))


def _not_square(run):
    np.save(run.oof, np.zeros((3, C, S, S + 1), np.float16))


def _fewer_maps(run):
    np.save(run.oof, np.zeros((2, C, S, S), np.float16))


def _row_out_of_range(run):
    index = pd.read_csv(run.oof_index)
    index.loc[0, "row"] = 7
    index.to_csv(run.oof_index, index=False)


def _no_rel_column(run):
    pd.read_csv(run.oof_index).drop(columns="rel").to_csv(run.oof_index, index=False)


def _empty_index(run):
    run.oof_index.write_text("")


def _half_a_box(run):
    pd.read_csv(run.oof_index).assign(box_y0=0).to_csv(run.oof_index, index=False)


@pytest.mark.parametrize(
    ("damage", "file", "fragment"),
    [
        (_truncate, "oof.npy", "damaged"),
        (_garbage, "oof.npy", "damaged"),
        (_wrong_classes, "oof.npy", "expected (N, 29, S, S)"),
        (_not_square, "oof.npy", "expected (N, 29, S, S)"),
        (_fewer_maps, "oof.npy", "2 maps, but"),
        (_row_out_of_range, "oof.npy", "outside 0..2"),
        (_no_rel_column, "oof_index.csv", "no column(s) ['rel']"),
        (_empty_index, "oof_index.csv", "cannot be read"),
        (_half_a_box, "oof_index.csv", "box_y1"),
    ],
)
def test_a_damaged_oof_is_one_line_naming_the_file(tmp_path, damage, file, fragment):
    run = _write_run(tmp_path)
    damage(run)
    with pytest.raises(RunError) as e:
        open_oof(run)
    msg = str(e.value)
    assert msg.startswith(str(run.path / file)) and fragment in msg, msg
    assert "\n" not in msg and "train.save_oof=true" in msg and "--fold 0" in msg


def test_a_run_without_oof_says_how_to_get_it(tmp_path):
    run = _write_run(tmp_path)
    run.oof.unlink()
    assert not has_oof(run)
    with pytest.raises(RunError, match=r"fold0: no out-of-fold predictions \(oof\.npy\)"):
        open_oof(run.path)
