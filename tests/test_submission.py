"""Submission CSV: order and atomic writes; the validator catches each kind of slip; the
scorer agrees with the metric on masks of known Dice."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from bonecomp import rle
from bonecomp.classes import CLASSES
from bonecomp.data.annotations import load_annotation
from bonecomp.data.images import read_image
from bonecomp.data.layout import discover
from bonecomp.submission import (
    HEADER,
    SubmissionError,
    SubmissionWriter,
    compare_submissions,
    read_submission,
    score_submission,
    validate_submission,
    write_submission,
)
from bonecomp.testing import dense_dice, dense_truth

SHAPE = (16, 16)
NAMES = ["image1_R.png", "image2.png"]


def _rows(names=NAMES, fill=""):
    return [(n, [fill] * 29) for n in names]


def test_writer_order_and_header(tmp_path):
    path = write_submission(tmp_path / "s.csv", _rows(fill="1 3"))
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(HEADER)
    assert len(lines) == 1 + 2 * 29
    assert lines[1] == "image1_R.png,finger-1,1 3"  # bare name, _R kept intact
    assert [ln.split(",")[1] for ln in lines[1:30]] == list(CLASSES)
    df = read_submission(path)
    assert df["rle"].iloc[0] == "1 3"


def test_empty_masks_round_trip_as_empty(tmp_path):
    path = write_submission(tmp_path / "s.csv", _rows())
    assert path.read_text().splitlines()[1] == "image1_R.png,finger-1,"
    assert pd.read_csv(path)["rle"].isna().all()  # what pandas does: our decoder accepts it
    assert not rle.decode(pd.read_csv(path)["rle"].iloc[0], SHAPE).any()


def test_crash_leaves_no_file_under_the_final_name(tmp_path):
    final = tmp_path / "s.csv"
    with pytest.raises(RuntimeError), SubmissionWriter(final) as w:
        w.add(NAMES[0], [""] * 29)
        raise RuntimeError("killed")
    assert not final.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="expected 29"):
        SubmissionWriter(final).add(NAMES[0], [""] * 28)


def test_valid_file_passes(tmp_path):
    path = write_submission(tmp_path / "s.csv", _rows(fill="1 3"))
    report = validate_submission(path, NAMES, SHAPE)
    assert report.ok, report.problems
    assert (report.rows, report.images, report.empty) == (58, 2, 0)
    assert report.summary().startswith("OK")


def _broken(tmp_path, edit):
    path = write_submission(tmp_path / "s.csv", _rows(fill="1 3"))
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda ls: ls.__setitem__(0, "image,class,rle"), "header"),
        (lambda ls: ls.pop(), "57 rows, expected 58"),
        (lambda ls: ls.__setitem__(1, ls[1].replace("image1_R", "image9")), "line 2: image_name"),
        (lambda ls: ls.__setitem__(2, ls[2].replace("finger-2", "finger-3")), "line 3: class"),
        (lambda ls: ls.__setitem__(5, ls[5].replace("1 3", "1 3 5")), "line 6: bad RLE"),
        (lambda ls: ls.__setitem__(5, ls[5].replace("1 3", "250 10")), "past the end"),
        (lambda ls: ls.__setitem__(5, ls[5].replace("1 3", "0 3")), "not positive"),
        (lambda ls: ls.__setitem__(31, ls[2].replace("1 3", "1 3")), "duplicate"),
    ],
)
def test_validator_catches_each_slip(tmp_path, edit, fragment):
    report = validate_submission(_broken(tmp_path, edit), NAMES, SHAPE)
    assert not report.ok
    assert any(fragment in p for p in report.problems), report.problems


def test_validator_catches_wrong_image_order(tmp_path):
    path = write_submission(tmp_path / "s.csv", _rows(NAMES[::-1], "1 3"))
    report = validate_submission(path, NAMES, SHAPE)
    assert any("expected 'image1_R.png'" in p for p in report.problems)


def test_scorer_agrees_with_metric(tiny_root, tmp_path):
    test = discover(tiny_root, "test")
    labels = tiny_root / "test_labels"
    rng = np.random.default_rng(0)
    rows, want = [], []
    for rel, name in zip(test["rel"], test["name"], strict=True):
        truth = dense_truth(load_annotation(labels / rel.replace(".png", ".json")), (128, 128))
        pred = truth.copy()
        pred[:, rng.integers(0, 128, 200), rng.integers(0, 128, 200)] ^= 1  # known damage
        pred[5] = 0  # one class predicted empty
        rows.append((name, rle.encode_many(pred)))
        want.append(dense_dice(pred, truth))
    path = write_submission(tmp_path / "s.csv", rows)
    assert validate_submission(path, test["name"].tolist(), (128, 128)).ok
    table, dice = score_submission(path, labels, (128, 128), progress=False)
    np.testing.assert_allclose(dice, np.stack(want), atol=1e-12)
    assert table.mean == pytest.approx(np.stack(want).mean(0).mean())
    assert (dice[:, 5] < 1e-3).all() and dice.min() >= 0


def test_compare_two_submissions(tmp_path):
    a = write_submission(tmp_path / "a.csv", _rows(fill="1 10"))
    b = write_submission(tmp_path / "b.csv", _rows(fill="6 10"))
    table = compare_submissions(a, b, SHAPE)
    assert table.mean == pytest.approx((2 * 5 + 1e-4) / (20 + 1e-4))
    assert compare_submissions(a, a, SHAPE).mean == 1.0


def test_invalid_file_never_takes_the_final_name(tmp_path):
    final = tmp_path / "s.csv"
    w = SubmissionWriter(final)
    w.add(NAMES[0], ["1 3"] * 29)  # the second image is missing
    with pytest.raises(SubmissionError, match="expected 58"):
        w.close(check=lambda tmp: validate_submission(tmp, NAMES, SHAPE))
    assert not final.exists() and (tmp_path / "s.invalid.csv").exists()


def test_scorer_refuses_rows_out_of_order(tiny_root, tmp_path):
    names = discover(tiny_root, "test")["name"].tolist()
    path = write_submission(tmp_path / "s.csv", [(n, [""] * 29) for n in names])
    df = read_submission(path)
    df.iloc[[0, 1]] = df.iloc[[1, 0]].to_numpy()  # swap two classes of the first image
    df.to_csv(path, index=False)
    with pytest.raises(SubmissionError, match="class order"):
        score_submission(path, tiny_root / "test_labels", (128, 128), progress=False)


# ------------------------------------------------------------- warnings (valid files)
def _check_script(csv, tiny_root, capsys) -> tuple[int, str]:
    import sys

    from bonecomp.testing import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    import check_submission

    code = check_submission.main([str(csv), "--data", str(tiny_root)])
    return code, capsys.readouterr().out


def _test_rows(tiny_root, fill="1 3", empty_classes=()):
    names = discover(tiny_root, "test")["name"].tolist()
    rles = ["" if c in empty_classes else fill for c in CLASSES]
    return [(n, rles) for n in names]


def test_a_class_never_predicted_is_a_warning_not_a_failure(tiny_root, tmp_path, capsys):
    csv = write_submission(tmp_path / "s.csv", _test_rows(tiny_root, empty_classes={"Pisiform"}))
    code, out = _check_script(csv, tiny_root, capsys)
    assert code == 0, out
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert warnings == [
        "warning: class Pisiform: every mask is empty (4 images); check its threshold"
    ]
    assert "OK" in out and "1 warning(s)" in out


def test_a_file_of_empty_masks_is_one_warning(tiny_root, tmp_path, capsys):
    csv = write_submission(tmp_path / "s.csv", _test_rows(tiny_root, fill=""))
    code, out = _check_script(csv, tiny_root, capsys)
    assert code == 0, out
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "every mask in the file is empty (116 rows)" in warnings[0]


def test_a_byte_order_mark_is_accepted_with_a_warning(tiny_root, tmp_path, capsys):
    csv = write_submission(tmp_path / "s.csv", _test_rows(tiny_root))
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes())
    names = discover(tiny_root, "test")["name"].tolist()
    report = validate_submission(csv, names, (128, 128))
    assert report.ok, report.problems  # the header is read without the BOM
    assert len(report.warnings) == 1 and "byte-order mark (BOM): accepted" in report.warnings[0]
    code, out = _check_script(csv, tiny_root, capsys)
    assert code == 0 and "warning: the file starts with a UTF-8 byte-order mark" in out
    # ...and only the BOM is dropped: a wrong header behind it is still a problem.
    csv.write_bytes(csv.read_bytes().replace(b"image_name", b"image", 1))
    report = validate_submission(csv, names, (128, 128))
    assert any("header 'image,class,rle'" in p for p in report.problems), report.problems


def test_a_clean_file_has_no_warnings(tmp_path):
    report = validate_submission(
        write_submission(tmp_path / "s.csv", _rows(fill="1 3")), NAMES, SHAPE
    )
    assert report.ok and report.warnings == []


# ------------------------------------------------------------------ per-image sizes
SIZES = [(128, 128), (96, 160), (160, 160), (128, 128)]  # (H, W) of the 4 test PNGs, in order


@pytest.fixture
def mixed_sizes(tiny_copy):
    """A copy of the tiny phantom whose test PNGs have the sizes ``SIZES``."""
    test = discover(tiny_copy, "test")
    for path, (h, w) in zip(test["image_path"], SIZES, strict=True):
        cv2.imwrite(str(path), cv2.resize(read_image(path), (w, h)))
    return tiny_copy


def test_each_image_rle_is_judged_against_its_own_png_size(mixed_sizes, tmp_path, capsys):
    """``check_submission.py --data`` reads each test PNG's size: a run ending at pixel
    16010 fits the 128 x 128 image (16384 pixels) but not the 96 x 160 one (15360); one
    ending at 20010 fits the 160 x 160 image (25600) but not a 128 x 128 one."""
    names = discover(mixed_sizes, "test")["name"].tolist()
    fits_128, fits_160 = "16001 10", "20001 10"

    def first_class(codes: dict[int, str], name: str):  # image number -> its first RLE
        rows = [(n, [codes.get(k, "")] + [""] * 28) for k, n in enumerate(names)]
        return write_submission(tmp_path / name, rows)

    ok = first_class({0: fits_128, 2: fits_160, 3: fits_128}, "ok.csv")
    code, out = _check_script(ok, mixed_sizes, capsys)
    assert code == 0 and "OK" in out, out
    bad = first_class({0: fits_160, 1: fits_128, 2: fits_160}, "bad.csv")
    code, out = _check_script(bad, mixed_sizes, capsys)
    problems = [ln for ln in out.splitlines() if ln.startswith("line ")]
    assert code == 1 and len(problems) == 2, out
    assert problems[0].startswith(f"line 2: bad RLE for {names[0]} {CLASSES[0]}: ")
    assert problems[0].endswith("past the end of a 128x128 mask")
    assert problems[1].startswith(f"line {2 + 29}: bad RLE for {names[1]} {CLASSES[0]}: ")
    assert problems[1].endswith("past the end of a 96x160 mask")
    # rows of a named test image are judged against that image's size, also when an
    # image's rows are missing and the rest moved up (no false "bad RLE" for them)
    df = read_submission(ok)
    df[df["image_name"] != names[1]].to_csv(tmp_path / "short.csv", index=False)
    code, out = _check_script(tmp_path / "short.csv", mixed_sizes, capsys)
    assert code == 1 and "have no rows" in out and "bad RLE" not in out, out
