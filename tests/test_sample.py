"""The sample contract (``bonecomp.data.sample``): the per-pixel input example of
docs/extending.md (a distance-map field and a loss term reading it, one file of the
user's) trains with whole images, patches and pseudo-labels mixed into the batches, and
the field reaches the loss as an independent distance transform of the batch's mask;
a field costs nothing until a term reads it and never moves the random stream; an
unknown field is one line at the config check; a batch mixing items of two contracts
is refused in one line."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy.ndimage import distance_transform_edt

from bonecomp import losses
from bonecomp.checks import check_config
from bonecomp.classes import NUM_CLASSES
from bonecomp.config import ConfigError
from bonecomp.data.images import read_image
from bonecomp.data.layout import discover
from bonecomp.data.pseudo_dir import PseudoWriter
from bonecomp.data.sample import FIELDS, Sample
from bonecomp.distributed import Dist
from bonecomp.testing import REPO, tiny_config
from bonecomp.training import run_training
from bonecomp.training.data import build_loaders, fold_split, open_pseudo_labels, prepare_cache

PAGE = REPO / "docs" / "extending.md"
SIZE, PATCH = 64, 32  # the tiny runs' cache and patch sides


def _block(lang: str, first_line: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", PAGE.read_text(), flags=re.S)
    (block,) = [b for b in blocks if b.startswith(first_line)]
    return block


def distance_example(folder: Path) -> dict:
    """The page's ``my_distance.py`` written into ``folder``; the overrides of its recipe
    (``configs/my_boundary.yaml`` minus ``extends``) with the module's absolute path."""
    source = _block("python", "# my_distance.py")
    module = folder / "my_distance.py"
    module.write_text(source)
    recipe = yaml.safe_load(_block("yaml", "# configs/my_boundary.yaml"))
    assert recipe.pop("extends") == "demo.yaml" and recipe.pop("extensions") == [module.name]
    assert set(recipe) == {"loss"}, "the recipe only adds the extension and its term"
    return {"extensions": [str(module)], "loss.terms": recipe["loss"]["terms"]}


def record_term(name: str, seen: list) -> None:
    """Re-register the term ``name`` (same builder and fields) so that every batch it is
    called with lands in ``seen`` (on the CPU), with whether it was a training forward."""
    registered = losses.TERMS.get(name)
    builder, fields = registered.build, registered.fields

    def recording(cfg):
        term = builder(cfg)

        def call(logits, batch):
            got = {k: v.detach().cpu().clone() for k, v in batch.items() if torch.is_tensor(v)}
            seen.append({**got, "training": torch.is_grad_enabled()})
            return term(logits, batch)

        return call

    losses.register_loss(name, recording, fields=fields, replace=True)


def reference_distance(mask: torch.Tensor, clip: float) -> np.ndarray:
    """The example's field computed independently from a batch's float mask: scipy's
    exact Euclidean distance transform per image and class (an absent or full class has
    no outline: +-clip everywhere)."""
    inside = mask.numpy() >= 0.5
    out = np.empty(inside.shape, np.float64)
    far = np.full(inside.shape[-2:], np.inf)
    for idx in np.ndindex(*inside.shape[:-2]):
        m = inside[idx]
        to_bone = distance_transform_edt(~m) if m.any() else far
        to_background = distance_transform_edt(m) if (~m).any() else far
        out[idx] = np.clip(to_bone - to_background, -clip, clip) / clip
    return out


@pytest.fixture(scope="module")
def pseudo_folder(tiny_root, tmp_path_factory) -> Path:
    """A pseudo-label folder of the tiny test images at 64 px with smooth random
    probabilities (no trained model needed: the targets only need bones and edges)."""
    test = discover(tiny_root, "test")
    index = test[["rel", "patient", "name"]].copy()
    index["src_h"], index["src_w"] = 128, 128
    out = tmp_path_factory.mktemp("pl") / "pseudo"
    writer = PseudoWriter(out, index, SIZE)
    rng = np.random.default_rng(0)
    for row, path in enumerate(test["image_path"]):
        image = cv2.resize(read_image(path), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        noise = rng.random((SIZE, SIZE, NUM_CLASSES)).astype(np.float32)
        blobs = cv2.GaussianBlur(noise, (0, 0), 4).transpose(2, 0, 1)
        writer.add(row, image, np.clip((blobs - 0.5) * 8 + 0.5, 0, 1))
    return writer.close({"thresholds": [0.5] * NUM_CLASSES, "preprocess": ""}).path


CASES = {
    "whole images": {},
    "patches": {"data.patch_size": PATCH},
    "pseudo-labels and patches": {"data.patch_size": PATCH, "train.pseudo_labels": True},
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_distance_example_reaches_the_loss(
    tiny_root, tmp_path, registries, pseudo_folder, case
):
    extra = dict(CASES[case])
    if extra.pop("train.pseudo_labels", False):
        extra["train.pseudo_labels"] = str(pseudo_folder)
    keys = {**distance_example(tmp_path), **extra, "train.epochs": 1, "train.val_every": 1}
    cfg = tiny_config(tiny_root, tmp_path, **keys)
    check_config(cfg)  # imports the example: the field and the term are registered
    assert "distance" in FIELDS and losses.TERMS.get("boundary").fields == ("distance",)
    clip = FIELDS.get("distance").make.__globals__["CLIP"]
    seen: list[dict] = []
    record_term("boundary", seen)

    result = run_training(cfg, 0, progress=False)

    summary = pd.read_csv(result.run_dir / "summary.csv")
    assert np.isfinite(summary["loss_boundary"]).all() and np.isfinite(summary["val_loss"]).all()
    train = [b for b in seen if b["training"]]
    val = [b for b in seen if not b["training"]]
    assert train and val
    side = PATCH if "data.patch_size" in extra else SIZE
    for batch in seen:
        d, mask = batch["distance"], batch["mask"]
        assert d.dtype == torch.float32 and d.shape == mask.shape  # (B, C, P, P), on device
        assert mask.shape[-1] == (side if batch["training"] else SIZE)  # validation: whole
        np.testing.assert_allclose(d.numpy(), reference_distance(mask, clip), atol=1e-3)
    every = torch.cat([b["distance"] for b in train]).flatten()
    assert (every < 0).any() and (every > 0).any() and (every.abs() < 1).any()  # bones, edges
    n_real = len(discover(tiny_root, "train"))
    pseudo_rows = {int(i) for b in train for i in b["index"] if i >= n_real}
    if "train.pseudo_labels" in extra:
        assert pseudo_rows  # pseudo-label items went through the loss, beside real ones
        assert any((b["index"] < n_real).any() and (b["index"] >= n_real).any() for b in train)
    else:
        assert not pseudo_rows


def _epoch(cfg, folder) -> tuple[list[dict], list[dict], object]:
    """One epoch of fold 0's training batches and the validation batches of ``cfg``."""
    table = discover(cfg.data.root, "train")
    folds, cache = prepare_cache(cfg, table, Dist(), False)
    train_idx, val_idx = fold_split(folds, 0)
    data = build_loaders(cfg, cache, train_idx, val_idx, pseudo=open_pseudo_labels(cfg, table))
    data.start_epoch(cfg.train.seed, 0, 0)
    return list(data.train_loader), list(data.val_loader), data


def test_a_field_costs_nothing_until_a_term_reads_it_and_keeps_the_stream(
    tiny_root, tmp_path, registries, pseudo_folder
):
    keys = distance_example(tmp_path)
    mixed = {"data.patch_size": PATCH, "train.pseudo_labels": str(pseudo_folder)}
    plain = tiny_config(tiny_root, tmp_path, **mixed, extensions=keys["extensions"])
    check_config(plain)  # registered, but the recipe's loss does not read it
    made = []
    field = FIELDS.get("distance")
    FIELDS.register("distance", type(field)(lambda item: made.append(item.index) or
                    field.make(item), field.dtype, field.on_device), replace=True)  # fmt: skip
    train, val, _ = _epoch(plain, pseudo_folder)
    assert made == [] and all("distance" not in b for b in train + val)

    reading = tiny_config(tiny_root, tmp_path, **mixed, **keys)
    check_config(reading)
    train_d, val_d, data = _epoch(reading, pseudo_folder)
    assert made and all(b["distance"].dtype == torch.float16 for b in train_d + val_d)
    assert [list(b) for b in train_d] == [[*b, "distance"] for b in train]
    for a, b in zip(train + val, train_d + val_d, strict=True):  # the same items, drawn alike
        assert all(torch.equal(a[k], b[k]) for k in a)

    # every item kind carries the contract's keys; one that does not is refused in a line
    ds = data.train_loader.dataset
    real, pseudo = ds[0], ds[len(ds) - 1]
    assert list(real) == list(pseudo) == ["image", "mask", "index", "origin", "distance"]
    del pseudo["distance"]
    with pytest.raises(ValueError, match=r"^item \d+ of a batch .*missing \['distance'\]") as e:
        data.train_loader.collate_fn([real, pseudo])
    assert len(str(e.value).splitlines()) == 1


def test_a_term_reading_an_unknown_field_is_one_line_at_the_config_check(
    tiny_root, tmp_path, registries
):
    losses.register_loss("ghostly", lambda cfg: lambda y, b: b["ghost"].mean(), fields=["ghost"])
    cfg = tiny_config(tiny_root, tmp_path, **{"loss.terms": {"bce": 1.0, "ghostly": 0.5}})
    want = (
        r"^command line: loss\.terms: unknown sample field 'ghost'; valid: image, mask, index, "
        r"origin \(read by loss term 'ghostly'\)$"
    )
    with pytest.raises(ConfigError, match=want):
        check_config(cfg)
    cfg.loss.terms = {"bce": 1.0, "ghostly": 0.0}  # a term weighted 0 is not built: fine
    check_config(cfg)
    with pytest.raises(ConfigError, match=r"^loss\.terms: unknown sample field 'ghost'"):
        Sample(["ghost"])


def test_synthetic_items_go_through_the_contract(registries):
    """The probe's and the doctor's random items (no data) carry every field too."""
    from bonecomp.data.sample import register_field

    register_field("band", lambda item: item.mask.max(0, keepdims=True), dtype=torch.uint8)
    contract = Sample(["band"], patch=True)
    batch = contract.collate([contract.synthetic(16, soft=True, seed=s) for s in range(3)])
    assert list(batch) == ["image", "mask", "index", "origin", "band"]
    assert batch["band"].shape == (3, 1, 16, 16) and batch["image"].dtype == torch.uint8
    assert torch.equal(batch["band"][:, 0], batch["mask"].amax(1))
