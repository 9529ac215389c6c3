"""The carpal crop stage: box geometry, an exact paste (a crop that echoes the first stage
changes no byte; a known crop changes exactly its box), and inference end to end."""

from __future__ import annotations

import re
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from bonecomp.classes import CARPALS, CLASSES
from bonecomp.config import ConfigError
from bonecomp.data.annotations import load_annotation
from bonecomp.data.cache import CacheSpec, data_cache_dir, open_cache
from bonecomp.data.carpal_box import crop_image, grid_box, square_box, truth_box
from bonecomp.data.images import read_image
from bonecomp.data.layout import discover
from bonecomp.inference import carpal_stage as crop_module
from bonecomp.inference.carpal_stage import crop_oof_dice, paste_crop, prediction_box
from bonecomp.inference.postprocess import upsample_threshold
from bonecomp.inference.predict import predict_submission
from bonecomp.inference.thresholds import grid_dice, oof_items, write_thresholds
from bonecomp.memory import BatchMemoryError, MemoryBudget
from bonecomp.runs import MemberSpec, RunDir, RunError, crop_members, ensemble_members
from bonecomp.submission import read_submission
from bonecomp.testing import REPO, dense_truth, tiny_config, tiny_overrides
from bonecomp.training import run_training
from bonecomp.viz import oof_images
from tests.test_memory import attach_budget

CARP = list(CARPALS)


def dense_paste(full, hw, ts, logits, box, crop, crop_logits, weights) -> torch.Tensor:
    """The definition with full float maps (C, H, W): the reference for ``paste_crop``."""
    up = F.interpolate(full[None].float(), size=hw, mode="bilinear", align_corners=False)[0]
    p = torch.sigmoid(up) if logits else up
    y0, y1, x0, x1 = box
    q = F.interpolate(crop[None, CARP].float(), (y1 - y0, x1 - x0), mode="bilinear")[0]
    q = torch.sigmoid(q) if crop_logits else q
    for k, c in enumerate(CARPALS):
        inner = p[c, y0:y1, x0:x1].contiguous()
        p[c, y0:y1, x0:x1] = torch.lerp(inner, q[k].contiguous(), float(weights[k]))
    return p > torch.tensor(ts)[:, None, None]


def _first_stage(seed: int, h: int = 32, logits: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((29, h, h), generator=g) * 4 - 1
    return x if logits else torch.sigmoid(x)


def _echo(full, hw, logits, box) -> torch.Tensor:
    """A crop map at the box's own size holding the first stage's probabilities there."""
    up = F.interpolate(full[None], size=hw, mode="bilinear", align_corners=False)[0]
    p = torch.sigmoid(up) if logits else up
    y0, y1, x0, x1 = box
    return p[:, y0:y1, x0:x1].clone()


def test_square_box_is_square_inside_the_image_and_grows_by_the_margin():
    assert square_box(10, 30, 50, 60, (128, 128), 0.0) == (10, 30, 45, 65)
    assert square_box(10, 30, 50, 60, (128, 128), 0.5) == (0, 40, 35, 75)  # moved, not cut
    assert square_box(0, 128, 0, 128, (128, 128), 1.0) == (0, 128, 0, 128)  # cut to the image
    flags = np.zeros((32, 32), bool)
    assert grid_box(flags, (128, 128), 0.1) is None
    flags[4:6, 8:9] = True  # grid rows 4..5, col 8 -> source rows 16..24, cols 32..36
    assert grid_box(flags, (128, 128), 0.0) == (16, 24, 30, 38)


@pytest.mark.parametrize("logits", [True, False])
@pytest.mark.parametrize("weight", [1.0, 0.3, 0.5])
def test_a_crop_that_echoes_the_first_stage_changes_no_mask(logits, weight):
    full, hw = _first_stage(0, logits=logits), (128, 128)
    ts = [0.5] * 20 + [0.35, 0.6] + [0.5] * 7
    box = (21, 77, 40, 96)
    crop = _echo(full, hw, logits, box)
    base = upsample_threshold(full, hw, ts, logits)
    got = paste_crop(full, hw, ts, logits, box, crop, False, [weight] * 8)
    assert got.rle() == base.rle()


def test_a_known_crop_changes_exactly_its_box_for_its_class():
    full, hw = _first_stage(1), (128, 128)
    box = (30, 70, 50, 90)
    crop = _echo(full, hw, True, box)
    c = CARPALS[2]
    crop[c] = 1.0  # the crop model is sure the whole box is this class
    base = upsample_threshold(full, hw, 0.5).dense()
    got = paste_crop(full, hw, 0.5, True, box, crop, False, [1.0] * 8).dense()
    want = base.clone()
    want[c, 30:70, 50:90] = True
    assert torch.equal(got, want)
    assert not torch.equal(got, base)  # the box was not already full


@pytest.mark.parametrize(("h", "H"), [(32, 128), (24, 128), (64, 256)])
def test_paste_equals_the_dense_definition(h, H):
    full, hw = _first_stage(2, h), (H, H)
    g = torch.Generator().manual_seed(3)
    crop = torch.randn((29, 16, 16), generator=g) * 3
    weights = [0.0, 1.0, 0.5, 0.25, 0.7, 1.0, 0.1, 0.9]
    ts = [0.5] * 29
    full[CARP] -= 30
    full[CARP, h // 3 : h // 2, h // 4 : h // 2] += 31  # the carpals lie in one region
    box = prediction_box(full, hw, True, 0.5, 0.1)
    assert box is not None and box != (0, H, 0, H)
    got = paste_crop(full, hw, ts, True, box, crop, True, weights).dense()
    want = dense_paste(full, hw, ts, True, box, crop, True, weights)
    assert torch.equal(got, want)
    assert not torch.equal(got, upsample_threshold(full, hw, ts).dense())


# ----------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    # threshold 0.02: this barely trained model's carpal probabilities lie around it, so
    # its carpal masks are neither empty nor full and any change to the crop shows.
    extra = {"train.epochs": 1, "infer.tta": ["none"], "infer.batch_size": 1}
    extra["infer.threshold"] = 0.02
    cfg = tiny_config(tiny_root, work, **extra)
    run_training(cfg, 0, progress=False)
    # The same model as a "crop experiment": on a box that is the whole image it must
    # reproduce the first stage exactly.
    echo = work / "runs" / "echo" / "fold0"
    shutil.copytree(work / "runs" / "tiny" / "fold0", echo)
    saved = yaml.safe_load((echo / "config.yaml").read_text())
    saved["data"]["crop"] = "carpal"
    (echo / "config.yaml").write_text(yaml.safe_dump(saved))
    # A crop model sure of every class everywhere: its output bias raised by 100.
    sure = work / "runs" / "sure" / "fold0"
    shutil.copytree(echo, sure)
    ckpt = torch.load(sure / "best.pt", weights_only=True)
    head = [k for k, v in ckpt["model"].items() if k.endswith("bias") and v.shape == (29,)][-1]
    ckpt["model"][head] += 100
    torch.save(ckpt, sure / "best.pt")
    return cfg, work


def _with_crop(cfg, **crop):
    spec = cfg.infer.crop
    for k, v in {"experiment": "echo", "folds": [0], "threshold": 1e-6, **crop}.items():
        setattr(spec, k, v)


def test_an_echoing_crop_stage_leaves_the_csv_byte_identical(trained, tmp_path):
    cfg, _ = trained
    members = ensemble_members(cfg)
    plain = predict_submission(cfg, members, tmp_path / "plain.csv", progress=False)
    assert plain.crop_boxes is None
    rows = read_submission(plain.path)
    carpal = rows[rows["class"].isin([CLASSES[c] for c in CARPALS])]["rle"].fillna("")
    assert (carpal != "").any() and (carpal != "1 16384").any()  # the test can see a change
    for weight in (1.0, 0.5):
        _with_crop(cfg, weight=weight)
        try:
            res = predict_submission(cfg, members, tmp_path / f"crop{weight}.csv", progress=False)
        finally:
            cfg.infer.crop.experiment = None
        assert res.crop_boxes and all(b == (0, 128, 0, 128) for b in res.crop_boxes.values())
        assert res.path.read_bytes() == plain.path.read_bytes()


def test_a_sure_crop_model_changes_only_the_carpal_rows_inside_the_box(trained, tmp_path):
    cfg, _ = trained
    members = ensemble_members(cfg)
    plain = read_submission(
        predict_submission(cfg, members, tmp_path / "p.csv", progress=False).path
    )
    _with_crop(cfg, experiment="sure", weight=[1.0] * 7 + [0.0])
    try:
        res = predict_submission(cfg, members, tmp_path / "s.csv", progress=False)
    finally:
        cfg.infer.crop.experiment, cfg.infer.crop.weight = None, 1.0
    sure = read_submission(res.path)
    changed = CARP[:7]  # the 8th carpal has weight 0: the first stage's mask
    is_changed = sure["class"].isin([CLASSES[c] for c in changed]).to_numpy()
    assert (sure["rle"].fillna("") == "1 16384")[is_changed].all()  # the whole box (image)
    same = sure["rle"].fillna("") == plain["rle"].fillna("")
    assert same[~is_changed].all() and not same[is_changed].all()


def test_the_crop_checkpoint_and_margin_keys_reach_the_csv(trained, tiny_root, tmp_path):
    """``infer.crop.checkpoint`` naming a file of the fold folder (the sure model saved
    beside the echo's best.pt) turns the carpal rows into the whole box, where ``best``
    leaves the CSV as it was; ``infer.crop.margin`` grows the boxes pasted into the CSV
    by (1 + 2 m) per side."""
    _, work = trained
    echo = work / "runs" / "echo" / "fold0"
    shutil.copy(work / "runs" / "sure" / "fold0" / "best.pt", echo / "sure.pt")
    first = {
        "train.epochs": 1,
        "infer.tta": ["none"],
        "infer.batch_size": 1,
        "infer.threshold": 0.02,
    }  # the module's first stage, as its fixture set it
    plain_cfg = tiny_config(tiny_root, work, **first)
    plain = read_submission(
        predict_submission(plain_cfg, ensemble_members(plain_cfg), tmp_path / "p.csv").path
    )

    def csv(name: str, **crop):
        keys = {
            f"infer.crop.{k}": v for k, v in {"experiment": "echo", "folds": [0], **crop}.items()
        }
        cfg = tiny_config(tiny_root, work, **first, **keys)
        res = predict_submission(cfg, ensemble_members(cfg), tmp_path / name, progress=False)
        return read_submission(res.path), res.crop_boxes

    carpal = plain["class"].isin([CLASSES[c] for c in CARPALS]).to_numpy()
    best, _ = csv("best.csv", threshold=1e-6)  # the box is the image; the echo model
    assert (best["rle"] == plain["rle"]).all()
    sure, _ = csv("sure.csv", threshold=1e-6, checkpoint="sure.pt")
    assert (sure["rle"][carpal] == "1 16384").all() and (sure["rle"] == plain["rle"])[~carpal].all()
    # at 0.06 these barely trained models' carpal pixels mark boxes that still fit the
    # 128 px image when grown by 1.4 (at 0.03 the tiny recipe's box was 114 px: too big)
    sides = {}
    for m in (0.0, 0.2):
        _, boxes = csv(f"m{m}.csv", threshold=0.06, margin=m)
        sides[m] = {n: b[1] - b[0] for n, b in boxes.items() if b is not None}
    assert sides[0.0] and sides[0.0].keys() == sides[0.2].keys()
    for n, side in sides[0.0].items():
        assert side < 128 / 1.4 and sides[0.2][n] == pytest.approx(side * 1.4, abs=4), n


def test_crop_stage_user_errors_are_one_line(trained, tmp_path):
    cfg, _ = trained
    members = ensemble_members(cfg)
    _with_crop(cfg, folds=[0, 1])
    try:
        with pytest.raises(RunError, match=r"infer\.crop\.experiment 'echo'.*fold1"):
            predict_submission(cfg, members, tmp_path / "a.csv", progress=False)
        _with_crop(cfg, experiment="tiny")
        with pytest.raises(RunError, match="not trained on crops"):
            predict_submission(cfg, members, tmp_path / "b.csv", progress=False)
    finally:
        cfg.infer.crop.experiment = None
        cfg.infer.crop.folds = [0, 1, 2, 3, 4]


def test_crop_stage_out_of_memory_is_one_line_and_writes_no_csv(trained, tmp_path, monkeypatch):
    cfg, _ = trained
    members = ensemble_members(cfg)
    budget = MemoryBudget(total=0)  # not even one crop fits
    attach_budget(monkeypatch, budget, crop_module, "load_member")
    _with_crop(cfg)
    try:
        with pytest.raises(BatchMemoryError, match=r"crop stage.*infer\.crop\.experiment=null"):
            predict_submission(cfg, members, tmp_path / "c.csv", progress=False)
    finally:
        cfg.infer.crop.experiment = None
    assert budget.ooms == 1 and not list(tmp_path.glob("*.csv"))


def test_crop_keys_are_checked(tiny_root, tmp_path):
    with pytest.raises(ConfigError, match=r"infer\.crop\.margin"):
        tiny_config(tiny_root, tmp_path, **{"infer.crop.margin": -0.1})
    with pytest.raises(ConfigError, match=r"infer\.crop\.weight"):
        tiny_config(tiny_root, tmp_path, **{"infer.crop.weight": [0.5, 0.5]})
    with pytest.raises(ConfigError, match=r"data\.crop"):
        tiny_config(tiny_root, tmp_path, **{"data.crop": "wrist"})


# ----------------------------------------------------------------------- training on crops
@pytest.fixture(scope="module")
def carpal_run(trained, tiny_root):
    """A crop experiment ("carp", fold 0) beside the first stage ("tiny", fold 0)."""
    cfg, work = trained
    extra = {"train.epochs": 1, "train.experiment": "carp", "data.crop": "carpal"}
    crop_cfg = tiny_config(tiny_root, work, **extra)
    run_training(crop_cfg, 0, progress=False)
    return cfg, crop_cfg, work


def test_the_crop_cache_holds_the_carpal_boxes(carpal_run, tiny_root):
    _, crop_cfg, _ = carpal_run
    df = discover(tiny_root, "train")
    folder = data_cache_dir(crop_cfg.data.cache_dir, tiny_root)
    cache = open_cache(df, folder, CacheSpec(64, crop_margin=0.25), workers=1, progress=False)
    assert cache.dir.name == "train_64_carpal-m0.25"
    for i in (0, len(cache) - 1):
        row = cache.index.iloc[i]
        path = df.loc[df["rel"] == row["rel"]]
        polys = load_annotation(path["json_path"].iloc[0])
        box = truth_box(polys, (128, 128), 0.25)
        assert tuple(int(row[c]) for c in ("box_y0", "box_y1", "box_x0", "box_x1")) == box
        assert cache.src_hw(i) == (box[1] - box[0], box[3] - box[2])
        image = read_image(path["image_path"].iloc[0])
        assert np.array_equal(cache.image(i), crop_image(image, box, 64))
        # the truth drawn in the crop's frame is the full truth cut to the box
        full = dense_truth(polys, (128, 128))[:, box[0] : box[1], box[2] : box[3]]
        assert np.array_equal(dense_truth(cache.polygons(i), cache.src_hw(i)), full)
        carp = full[CARP]
        assert carp.any() and not carp[:, 0].any() and not carp[:, -1].any()  # margin kept


def test_carpal_oof_dice_with_and_without_the_crop(carpal_run, tiny_root, capsys):
    cfg, _, work = carpal_run
    first = ensemble_members(cfg)
    _with_crop(cfg, experiment="carp")
    try:
        crop = crop_members(cfg)
        t = 0.02  # these barely trained models' carpal probabilities lie around it
        res = crop_oof_dice(first, crop, tiny_root, [t] * 29, progress=False)
        # weight 0 is the first stage alone: threshold tuning's Dice at t for the carpals
        dice, n = grid_dice(oof_items(first, tiny_root, progress=False), (t,))
        assert res.n_images == n == 2
        np.testing.assert_allclose(res.without, dice[CARP, 0], atol=1e-12)
        assert res.dice.shape == (8, 5) and np.isfinite(res.dice).all()
        assert not np.allclose(res.at(1.0), res.without)  # the crop changed the masks

        sys.path.insert(0, str(REPO / "scripts"))
        import crop_oof

        args = ["--config", str(REPO / "configs" / "demo.yaml"), "--quiet"]
        over = tiny_overrides(tiny_root, work, **{"infer.crop.experiment": "carp"})
        assert crop_oof.main([*args, *over, "infer.crop.folds=[0]"]) == 0
        out = capsys.readouterr().out
        assert "Scaphoid" in out and "carpal OOF mean Dice over 2 images" in out
        assert crop_oof.main([*args, *tiny_overrides(tiny_root, work)]) == 2  # no crop stage
        assert "infer.crop.experiment is null" in capsys.readouterr().err
    finally:
        cfg.infer.crop.experiment = None


def test_inference_with_a_trained_crop_stage(carpal_run, tiny_root, tmp_path, capsys):
    cfg, _, work = carpal_run
    _with_crop(cfg, experiment="carp", threshold=0.025)
    try:
        res = predict_submission(cfg, ensemble_members(cfg), tmp_path / "s.csv", progress=False)
    finally:
        cfg.infer.crop.experiment = None
    assert res.report.ok and res.rows == 4 * 29
    assert res.crop_boxes is not None and len(res.crop_boxes) == 4

    sys.path.insert(0, str(REPO / "scripts"))
    import infer

    crop = {"infer.crop.experiment": "carp", "infer.crop.folds": [0], "infer.threshold": 0.02}
    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--ensemble", "--quiet"]
    args += ["--out", str(tmp_path / "cli.csv"), *tiny_overrides(tiny_root, work, **crop)]
    assert infer.main(args) == 0
    assert re.search(r"carpal crop \(carp\): \d/4 images re-predicted", capsys.readouterr().out)


def test_a_crop_experiments_oof_is_read_in_its_box(carpal_run):
    _, _, work = carpal_run
    run = RunDir(work / "runs" / "carp" / "fold0")
    images = oof_images(run)
    assert len(images) == 2
    for im in images:
        y0, y1, x0, x1 = im.box
        assert im.hw == (y1 - y0, x1 - x0)
        assert im.dice().shape == (29,)
        assert im.picture(scale=1.0).shape[:2] == im.hw  # the image cut to the box
    with pytest.raises(RunError, match="crop experiment"):
        next(oof_items([MemberSpec(run.best)], "unused", progress=False))


def test_crop_oof_scores_with_the_thresholds_file_in_use(carpal_run, tiny_root, tmp_path, capsys):
    """crop_oof.py with a thresholds file giving half the carpals 0.02 and the others 0.5:
    its "without" column (the first stage alone) is, per carpal, threshold tuning's OOF
    Dice at that carpal's threshold."""
    cfg, _, work = carpal_run
    ts = [0.5] * 29
    for c in CARPALS[::2]:
        ts[c] = 0.02  # these barely trained models' carpal probabilities lie around it
    path = write_thresholds(tmp_path / "thr.json", ts)
    sys.path.insert(0, str(REPO / "scripts"))
    import crop_oof

    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--quiet"]
    keys = {"infer.crop.experiment": "carp", "infer.crop.folds": [0], "infer.thresholds": str(path)}
    assert crop_oof.main([*args, *tiny_overrides(tiny_root, work, **keys)]) == 0
    printed = {ln.split()[0]: float(ln.split()[1]) for ln in capsys.readouterr().out.splitlines()
               if ln.split() and ln.split()[0] in {CLASSES[c] for c in CARPALS}}  # fmt: skip
    first = ensemble_members(cfg)
    at = {t: grid_dice(oof_items(first, tiny_root, progress=False), (t,))[0][:, 0]
          for t in (0.02, 0.5)}  # fmt: skip
    for c in CARPALS:
        assert printed[CLASSES[c]] == pytest.approx(at[ts[c]][c], abs=6e-5), CLASSES[c]
    assert any(abs(at[0.02][c] - at[0.5][c]) > 1e-3 for c in CARPALS[::2])  # it can fail


def test_a_crop_model_is_refused_as_a_whole_image_member_in_tunings_words(
    carpal_run, tiny_root, tmp_path, capsys
):
    """A carpal-crop checkpoint given to infer.py (``--checkpoints``, or its experiment in
    ``infer.ensemble``) is refused in the very line threshold tuning gives (it ran a box
    model on whole images and the submission validated OK); no CSV (issue 29, case 2)."""
    _, _, work = carpal_run
    crop_ckpt = work / "runs" / "carp" / "fold0" / "best.pt"
    sys.path.insert(0, str(REPO / "scripts"))
    import infer
    import tune_thresholds

    base = ["--config", str(REPO / "configs" / "demo.yaml"), "--quiet"]
    over = tiny_overrides(tiny_root, work)
    assert tune_thresholds.main([*base, *over, "--checkpoints", str(crop_ckpt)]) == 2
    tuned = capsys.readouterr().err.strip()
    assert tuned.startswith(f"error: {crop_ckpt.parent} is a crop experiment (data.crop)")
    out = tmp_path / "s.csv"
    listed = "infer.ensemble=[{experiment: carp, folds: [0]}]"
    for how in (["--checkpoints", str(crop_ckpt)], ["--ensemble", listed]):
        assert infer.main([*base, "--out", str(out), *over, *how]) == 2
        assert capsys.readouterr().err.strip() == tuned
        assert not out.exists()
    assert tuned.endswith(
        "it was trained on the carpal box, not the whole image; use it as infer.crop "
        "(scripts/crop_oof.py), not as an ensemble member"
    )
