"""Fixed preprocessing (``data.preprocess``): the same pixels in the training cache and at
inference, its own cache, and each ensemble member preprocessed as its checkpoint says."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from bonecomp.checkpoint import save_checkpoint
from bonecomp.checks import check_config
from bonecomp.classes import CARPALS, CLASSES, NUM_CLASSES
from bonecomp.config import ConfigError, load_config, to_dict
from bonecomp.data.cache import (
    CacheSpec,
    check_cache,
    content_digest,
    open_cache,
    source_fingerprint,
)
from bonecomp.data.carpal_box import crop_image
from bonecomp.data.dataset import TestImages as InferenceImages
from bonecomp.data.dataset import to_float_image
from bonecomp.data.images import read_image
from bonecomp.data.layout import discover
from bonecomp.data.preprocess import NONE, Preprocess
from bonecomp.data.pseudo_dir import PseudoWriter, open_pseudo
from bonecomp.inference.carpal_stage import CarpalStage
from bonecomp.inference.ensemble import Ensemble, Member
from bonecomp.inference.predict import build_ensemble, predicted_batches
from bonecomp.inference.pseudo_labels import write_pseudo_labels
from bonecomp.inference.tta import views
from bonecomp.models import create_model
from bonecomp.runs import MemberSpec
from bonecomp.testing import DEMO_CONFIG, tiny_config, tiny_overrides
from bonecomp.training.data import open_pseudo_labels

SIZE = 64
CLAHE = Preprocess(("clahe",), 3.0, 4)  # not the defaults: the parameters must travel too
CPU = torch.device("cpu")


def reference(png: np.ndarray, size: int, clip: float = 3.0, grid: int = 4) -> np.ndarray:
    """OpenCV's CLAHE on the PNG at its source size, then the cache's INTER_AREA resize,
    written out here (never through bonecomp)."""
    out = cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid)).apply(png)
    return cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)


def plain(png: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(png, (size, size), interpolation=cv2.INTER_AREA)


# ------------------------------------------------------------------ cache == inference
def test_cache_row_and_inference_input_are_the_same_clahe_pixels(tiny_root, tmp_path):
    df = discover(tiny_root)
    cache = open_cache(
        df, tmp_path / "c", CacheSpec(SIZE, preprocess=CLAHE), workers=1, progress=False
    )
    items = InferenceImages(df, [(SIZE, CLAHE), SIZE])  # the training PNGs, as inference reads them
    for i in (0, 5, 9):
        j = int(np.flatnonzero(df["rel"].to_numpy() == cache.index["rel"].iloc[i])[0])
        png = read_image(df["image_path"].iloc[j])
        want = reference(png, SIZE)
        assert not np.array_equal(want, plain(png, SIZE))  # CLAHE changes the pixels
        item = items[j]
        np.testing.assert_array_equal(cache.image(i), want)
        np.testing.assert_array_equal(item[f"image{CLAHE.key(SIZE)}"].numpy(), want)
        np.testing.assert_array_equal(item[f"image{SIZE}"].numpy(), plain(png, SIZE))


def test_crop_cache_cuts_the_clahe_image_of_the_whole_png(tiny_root, tmp_path):
    df = discover(tiny_root)
    cache = open_cache(
        df,
        tmp_path / "c",
        CacheSpec(SIZE, crop_margin=0.25, preprocess=CLAHE),
        workers=1,
        progress=False,
    )
    row = cache.index.iloc[3]
    png = read_image(df.set_index("rel").loc[row["rel"], "image_path"])
    box = tuple(int(row[c]) for c in ("box_y0", "box_y1", "box_x0", "box_x1"))
    whole = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(png)
    y0, y1, x0, x1 = box
    want = cv2.resize(whole[y0:y1, x0:x1], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(cache.image(3), want)


# ------------------------------------------------------------------------- cache key
def test_a_cache_without_clahe_is_never_reused_for_a_clahe_run(tiny_root, tmp_path):
    df = discover(tiny_root)
    flat = open_cache(df, tmp_path / "c", CacheSpec(SIZE), workers=1, progress=False)
    other = Preprocess(("clahe",), 2.0, 8)
    clahe = open_cache(
        df, tmp_path / "c", CacheSpec(SIZE, preprocess=other), workers=1, progress=False
    )
    assert flat.dir != clahe.dir and clahe.dir.name == "train_64_clahe-2-8"
    assert (
        CacheSpec(SIZE, preprocess=CLAHE).dirname != CacheSpec(SIZE, preprocess=other).dirname
    )  # parameters too
    assert not np.array_equal(flat.images[0], clahe.images[0])
    fingerprints = {
        source_fingerprint(df, CacheSpec(SIZE, preprocess=p)) for p in (NONE, CLAHE, other)
    }
    assert len(fingerprints) == 3
    # even in the plain cache's folder, the CLAHE fingerprint does not accept it
    assert check_cache(flat.dir, source_fingerprint(df, CacheSpec(SIZE))) is None
    assert (
        check_cache(flat.dir, source_fingerprint(df, CacheSpec(SIZE, preprocess=other))) is not None
    )
    assert content_digest(flat.dir) != content_digest(clahe.dir)


# ---------------------------------------------------------------------- bad input
def test_an_unknown_step_is_one_line_naming_data_preprocess(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, tmp_path, **{"data.preprocess": ["clahe", "gamma"]})
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "command line" in msg
    assert msg == (
        "command line: data.preprocess[1]: unknown preprocessing step 'gamma'; valid: clahe"
    )
    twice = tiny_config(tiny_root, tmp_path, **{"data.preprocess": ["clahe", "clahe"]})
    with pytest.raises(ConfigError, match=r"data.preprocess: 'clahe' is listed twice"):
        check_config(twice)
    check_config(tiny_config(tiny_root, tmp_path, **{"data.preprocess": ["clahe"]}))


def test_train_script_refuses_an_unknown_step_with_exit_2(tiny_root, tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import train as script

    over = tiny_overrides(tiny_root, tmp_path, **{"data.preprocess": ["sharpen"]})
    assert script.main(["--config", str(DEMO_CONFIG), "--quiet", "--fold", "0", *over]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.preprocess" in err and "sharpen" in err
    assert not (tmp_path / "cache").exists()  # refused before any cache is built


# ------------------------------------------------------ members at inference
def _checkpoint(path: Path, cfg, model: nn.Module) -> MemberSpec:
    """A checkpoint as training writes one (its config, classes, input size, weights)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": to_dict(cfg), "classes": list(CLASSES), "fold": 0}
    payload |= {"input_size": cfg.data.image_size, "epoch": 1, "model": model.state_dict()}
    save_checkpoint(path, payload)
    return MemberSpec(path)


def test_each_member_gets_the_preprocessing_of_its_checkpoint(tiny_root, tmp_path):
    trained = tiny_config(tiny_root, tmp_path, **{"data.preprocess": ["clahe"]})
    trained.data.clahe_clip, trained.data.clahe_grid = 3.0, 4
    torch.manual_seed(0)
    model = create_model(trained.model).eval()
    runs = tmp_path / "runs"
    with_clahe = _checkpoint(runs / "clahe" / "fold0" / "best.pt", trained, model)
    no_clahe = trained.data.model_copy(update={"preprocess": []})
    without = trained.model_copy(update={"data": no_clahe})
    flat = _checkpoint(runs / "flat" / "fold0" / "best.pt", without, model)  # same weights

    infer = tiny_config(tiny_root, tmp_path, **{"infer.tta": ["none"]})  # says nothing of CLAHE
    assert infer.data.preprocess == []
    test = discover(tiny_root, "test")
    pngs = [read_image(p) for p in test["image_path"]]
    clahe_x = to_float_image(torch.from_numpy(np.stack([reference(p, SIZE) for p in pngs])))
    plain_x = to_float_image(torch.from_numpy(np.stack([plain(p, SIZE) for p in pngs])))
    with torch.no_grad():
        on_clahe, on_plain = model(clahe_x), model(plain_x)
    assert (on_clahe - on_plain).abs().max() > 1e-3  # the model sees the difference

    def predicted(members: list[MemberSpec]) -> torch.Tensor:
        ens, _, _ = build_ensemble(infer, members, CPU)
        batches = predicted_batches(ens, test, ens.inputs, infer, CPU, "t", progress=False)
        return torch.cat([pred for _, pred in batches])

    # one member, one view: the ensemble keeps logits
    torch.testing.assert_close(predicted([with_clahe]), on_clahe, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(predicted([flat]), on_plain, atol=1e-5, rtol=1e-5)
    both = (torch.sigmoid(on_clahe) + torch.sigmoid(on_plain)) / 2  # each its own input
    torch.testing.assert_close(predicted([with_clahe, flat]), both, atol=1e-5, rtol=1e-5)

    # pseudo-labels for a CLAHE run: its images are the CLAHE images its cache would hold
    folder = write_pseudo_labels(trained, [flat], tmp_path / "pl", progress=False).path
    pseudo = open_pseudo(folder)
    assert pseudo.meta["preprocess"] == "clahe-3-4"
    for i in range(len(pngs)):
        np.testing.assert_array_equal(pseudo.read(i)[0], reference(pngs[i], SIZE))


class Recorder(nn.Module):
    """Records its inputs; predicts nothing (all-zero logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return x.new_zeros(x.shape[0], NUM_CLASSES, *x.shape[-2:])


def test_the_carpal_stage_crops_the_clahe_image(tiny_root):
    path = discover(tiny_root, "test")["image_path"].iloc[0]
    png = read_image(path)
    rec, side = Recorder(), 32
    ens = Ensemble([Member("crop", rec, side, 1.0, CLAHE)], views(["none"]))
    stage = CarpalStage(ens, margin=0.25, threshold=0.5, weights=[1.0] * len(CARPALS))
    pred = torch.full((NUM_CLASSES, 64, 64), -5.0)
    pred[list(CARPALS), 24:40, 20:36] = 5.0  # the first stage's carpals: a box
    _, box = stage.masks(pred, True, path, png.shape, [0.5] * NUM_CLASSES)
    assert box is not None and len(rec.seen) == 1
    whole = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(png)
    seen = (rec.seen[0][0, 0] * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(seen, crop_image(whole, box, side))
    assert not np.array_equal(seen, crop_image(png, box, side))


# ------------------------------------------------------------------- pseudo-labels
def test_pseudo_labels_written_without_clahe_are_refused_for_a_clahe_run(tiny_root, tmp_path):
    test = discover(tiny_root, "test")
    index = test[["rel", "patient", "name"]].assign(src_h=128, src_w=128)
    writer = PseudoWriter(tmp_path / "pl", index, SIZE)
    for i in range(len(index)):
        writer.add(i, np.zeros((SIZE, SIZE), np.uint8), np.zeros((NUM_CLASSES, SIZE, SIZE)))
    writer.close({"thresholds": [0.5] * NUM_CLASSES})  # an older folder: no "preprocess"
    keys = {"train.pseudo_labels": str(tmp_path / "pl")}
    train = discover(tiny_root)
    assert open_pseudo_labels(tiny_config(tiny_root, tmp_path, **keys), train) is not None
    clahe = tiny_config(tiny_root, tmp_path, **keys, **{"data.preprocess": ["clahe"]})
    with pytest.raises(ConfigError) as e:
        open_pseudo_labels(clahe, train)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "train.pseudo_labels" in msg
    assert "data.preprocess none but this run has clahe-2-8" in msg


def test_base_config_documents_the_keys():
    cfg = load_config(DEMO_CONFIG)
    assert Preprocess.of(cfg.data) == NONE and not Preprocess.of(cfg.data)
    assert cfg.data.clahe_clip == 2.0 and cfg.data.clahe_grid == 8
