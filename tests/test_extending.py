"""docs/extending.md runs: its code blocks are the extension module a recipe names, a fold
is trained and a submission written with them through the normal config (each registered
entry is shown used where it lands: the loss in summary.csv, the metric, the architecture
built, the view run, the tracker's rows, the preprocessed cache and test images, the
stratified folds, the clean-up on the submission's masks and its choice by tuning), and
the config key example behaves as the page says. Also the ``extensions`` key's one-line
refusals, and every registry's one wording of an unknown name."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from bonecomp import losses, metrics, models
from bonecomp.checks import check_config
from bonecomp.classes import CLASSES
from bonecomp.config import ConfigError, base_yaml, check_values, from_dict, resume_may_change
from bonecomp.data import cache as cache_mod
from bonecomp.data.cache import data_cache_dir, find_cache
from bonecomp.data.folds import STRATIFIERS, folds_path
from bonecomp.data.images import read_image
from bonecomp.data.layout import discover
from bonecomp.data.preprocess import STEPS, register_preprocess
from bonecomp.inference import tta
from bonecomp.inference.cleanup import CLEANUP_RULES, candidates, choose_cleanup, cleanup_dice
from bonecomp.inference.predict import predict_submission
from bonecomp.runs import ensemble_members
from bonecomp.testing import (
    REPO,
    as_overrides,
    tiny_config,
    tiny_overrides,
)
from bonecomp.trackers import TRACKERS
from bonecomp.training import run_training

PAGE = REPO / "docs" / "extending.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", PAGE.read_text(), flags=re.S)


def _module_source() -> str:
    """The page's ``# my_extensions.py`` blocks, in order: the module its recipe names."""
    parts = [b for b in _blocks("python") if b.startswith("# my_extensions.py")]
    assert len(parts) == 8, (
        "the page shows a loss term, a view, an architecture, a metric, a tracker, a "
        "preprocessing step, a clean-up rule and a fold stratifier"
    )
    return "\n".join(parts)


def _recipe() -> dict:
    (block,) = [b for b in _blocks("yaml") if b.startswith("# configs/my_recipe.yaml")]
    return yaml.safe_load(block)


def _dotted(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "terms":
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.fixture
def registries(registries):
    """Registrations made by a test are undone afterwards (conftest), and the package
    ``my_ext_pkg`` a test imports is forgotten too."""
    yield
    sys.modules.pop("my_ext_pkg", None)


def test_the_page_trains_and_infers_through_the_normal_config(
    tiny_root, tmp_path, registries, monkeypatch
):
    # the cache is built by spawned workers, however few the images: they must import the
    # module that registers the preprocessing step
    monkeypatch.setattr(cache_mod, "_IMAGES_PER_WORKER", 1)
    module = tmp_path / "my_extensions.py"
    module.write_text(_module_source())
    recipe = _recipe()
    assert recipe.pop("extends") == "demo.yaml" and recipe.pop("extensions") == [module.name]
    # five patients: two folds leave each bin of the stratifier enough of them
    extra = {**_dotted(recipe), "extensions": [module.name], "train.epochs": 1, "data.n_splits": 2}
    cfg = tiny_config(tiny_root, tmp_path, **extra)  # the working folder is tmp_path
    built = []

    check_config(cfg)  # imports the module: the eight names are registered
    assert {"edge_bce"} <= set(losses.TERMS) and "worst_dice" in metrics.METRICS
    assert "rot180" in tta.view_names() and "unet_slim" in models.arch_names()
    assert "jsonl" in TRACKERS and "gamma07" in STEPS
    assert "open3" in CLEANUP_RULES and "exposure" in STRATIFIERS
    arch = models.get_arch("unet_slim")
    arch_build = arch.build

    def recording(cfg_model, classes, weights):
        net = arch_build(cfg_model, classes, weights)
        built.append(net)
        return net

    models.register_arch("unet_slim", recording, output_stride=arch.output_stride, replace=True)

    result = run_training(cfg, fold=0, progress=False)
    summary = pd.read_csv(result.run_dir / "summary.csv")
    assert {"loss_edge_bce", "loss_bce", "loss_dice", "val_worst_dice"} <= set(summary)
    assert np.isfinite(summary["loss_edge_bce"]).all()
    per_class = pd.read_csv(result.run_dir / "dice_per_class.csv")  # the only (best) epoch
    assert summary["val_worst_dice"].iloc[-1] == pytest.approx(np.nanmin(per_class["dice"]))
    # the registered architecture is what was trained: its decoder is the slim one
    assert built and built[0].decoder.blocks[-1].conv2[0].out_channels == 8

    # the tracker received every summary.csv row, then the per-class Dice and the report
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [x for x in lines if "epoch" in x]
    assert [r["epoch"] for r in rows] == summary["epoch"].tolist()
    for col in ("loss", "loss_edge_bce", "val_dice", "val_worst_dice", "lr"):
        assert [r[col] for r in rows] == pytest.approx(summary[col].tolist(), rel=1e-6), col
    (final,) = [x["final_dice"] for x in lines if "final_dice" in x]
    assert list(final) == list(CLASSES)
    assert final == pytest.approx(dict(zip(per_class["class"], per_class["dice"], strict=True)))

    # the cache holds the preprocessed PNGs (built by spawned workers that imported the
    # module), in a folder of its own
    cache = find_cache(cfg.data)
    assert cache is not None and cache.dir.name == "train_64_gamma07"
    train = discover(tiny_root).set_index("rel")
    gamma = STEPS.get("gamma07").apply
    for i in (0, 5, 9):
        png = read_image(train.loc[cache.index["rel"].iloc[i], "image_path"])
        want = cv2.resize(gamma(png, None), (64, 64), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(cache.image(i), want)
        assert not np.array_equal(want, cv2.resize(png, (64, 64), interpolation=cv2.INTER_AREA))

    # the folds the run used are the stratifier's: its column, both bins in each fold, and
    # the run validated on fold 0 of that file
    folds = pd.read_csv(
        folds_path(data_cache_dir(cfg.data.cache_dir, cfg.data.root), 2, None, "exposure")
    )
    assert list(folds.columns) == ["image", "patient", "fold", "exposure", "stratum"]
    measured = STRATIFIERS.get("exposure").measure(discover(tiny_root))
    assert folds["exposure"].tolist() == pytest.approx(measured[folds["image"]].tolist())
    assert folds.groupby("fold")["stratum"].nunique().tolist() == [2, 2]
    validated = pd.read_csv(result.run_dir / "oof_index.csv")
    assert sorted(validated["rel"]) == sorted(folds.loc[folds["fold"] == 0, "image"])

    views_seen = []
    rot180 = tta.get_view("rot180")

    def seen(x):
        views_seen.append(tuple(x.shape))
        return rot180.augment(x)

    tta.register_view("rot180", seen, rot180.deaugment, replace=True)
    pngs_seen = []

    def preprocessed(image, p):
        pngs_seen.append(image.copy())
        return gamma(image, p)

    register_preprocess("gamma07", preprocessed, replace=True)
    res = predict_submission(cfg, ensemble_members(cfg), tmp_path / "sub.csv", progress=False)
    assert res.report.ok and res.rows == 4 * 29
    assert res.views == ["none", "hflip", "rot180"] and views_seen  # used, not only listed
    assert len(built) == 2  # inference rebuilt the member through the registry
    test = discover(tiny_root, "test")  # every test PNG went through the step
    assert len(pngs_seen) == len(test)
    for png, path in zip(pngs_seen, test["image_path"], strict=True):
        np.testing.assert_array_equal(png, read_image(path))
    # the clean-up rule on the submission's masks: tests/test_cleanup.py (a model trained
    # long enough to predict bones); its choice by tuning: below


def test_tuning_chooses_the_pages_cleanup_rule_where_it_gains(tiny_root, tmp_path, registries):
    """Hand-made OOF maps: every class predicted as its truth, but one class with a
    one-pixel spur stuck to its bone, which neither largest, min_area nor fill_holes
    removes; tuning (with every registered rule) keeps open3 there and nowhere else."""
    module = tmp_path / "my_extensions.py"
    module.write_text(_module_source())
    check_config(tiny_config(tiny_root, tmp_path, extensions=[module.name]))
    side, c = 32, 4
    truth = np.zeros((len(CLASSES), side, side), bool)
    for k in range(len(CLASSES)):
        y, x = 2 + (k % 5) * 5, 2 + (k // 5) * 5
        truth[k, y : y + 4, x : x + 4] = True
    pred = truth.copy()
    y, x = 2 + (c % 5) * 5, 2 + (c // 5) * 5
    pred[c, y + 1, x + 4 : x + 8] = True  # the spur: 2 px wide at 64 px
    probs = torch.from_numpy(np.where(pred, 0.9, 0.1).astype(np.float32))
    up = np.repeat(np.repeat(truth, 2, 1), 2, 2)  # the truth at 64 px
    items = [(probs, [(0, 0, up[k].astype(np.uint8)) for k in range(len(CLASSES))], (64, 64))]
    combos = candidates(areas=(8,))  # every registered kind, open3 too
    assert any(r.name == "open3" for combo in combos for r in combo)
    dice, _ = cleanup_dice(items, [0.5] * len(CLASSES), combos)
    res = choose_cleanup(dice, combos)
    assert res.cleanup.table == {CLASSES[c]: ["open3"]}
    assert res.after.per_class[c] == pytest.approx(1.0) and res.before.per_class[c] < 0.95


def test_an_unknown_name_is_one_line_naming_the_valid_ones_at_every_point(
    tiny_root, tmp_path, registries
):
    """The one wording, for each key that names registry entries, with the page's module
    imported: its names are among the valid ones."""
    module = tmp_path / "my_extensions.py"
    module.write_text(_module_source())
    check_config(tiny_config(tiny_root, tmp_path, extensions=[module.name]))
    cases = {  # key: (value, the key named, kind, the unknown name, the page's name)
        "loss.terms": ({"bce": 0.5, "edge_bc": 0.5}, "loss.terms", "loss term", "edge_bc",
                       "edge_bce"),
        "infer.tta": (["none", "rot18"], "infer.tta[1]", "TTA view", "rot18", "rot180"),
        "model.arch": ("unet_slm", "model.arch", "architecture", "unet_slm", "unet_slim"),
        "train.trackers": (["jsnol"], "train.trackers[0]", "tracker", "jsnol", "jsonl"),
        "data.preprocess": (["gama07"], "data.preprocess[0]", "preprocessing step", "gama07",
                            "gamma07"),
        "infer.cleanup_rules": (["open"], "infer.cleanup_rules[0]", "clean-up rule", "open",
                                "open3"),
        "data.fold_stratify": ("exposur", "data.fold_stratify", "fold stratifier", "exposur",
                               "exposure"),
    }  # fmt: skip
    for key, (value, where, kind, bad, mine) in cases.items():
        cfg = tiny_config(tiny_root, tmp_path, extensions=[module.name], **{key: value})
        with pytest.raises(ConfigError) as e:
            check_config(cfg)
        head = f"command line: {where}: unknown {kind} {bad!r}; valid: "
        msg = str(e.value)
        assert msg.startswith(head) and "\n" not in msg and e.value.key == where, msg
        assert mine in msg[len(head) :].split(", "), msg
    with pytest.raises(ConfigError) as e:  # no key names a metric: the registry's own
        metrics.METRICS.get("worst_dic")
    assert str(e.value) == (
        "metrics: unknown validation metric 'worst_dic'; valid: loss, dice, worst_dice"
    )


def test_the_config_key_example_is_one_declaration(tmp_path, monkeypatch):
    (block,) = [b for b in _blocks("python") if b.startswith("# config key")]
    path = tmp_path / "my_config_key.py"  # a module of its own: its docstrings are the docs
    path.write_text(block)
    spec = importlib.util.spec_from_file_location("my_config_key", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "my_config_key", module)
    spec.loader.exec_module(module)
    my = module.MyConfig
    text = base_yaml(my)
    loss = text[text.index("\nloss:\n") : text.index("\ntrain:\n")]
    assert re.search(r"\n  label_smoothing: 0\.0 +# targets pulled toward 0\.5 by this share", loss)
    want = r"^config: loss\.label_smoothing must be in \[0, 0\.5\), got 0\.7$"  # names no file
    with pytest.raises(ConfigError, match=want):
        from_dict(my, {"loss": {"label_smoothing": 0.7}})
    cfg = from_dict(my, {"loss": {"label_smoothing": 0.3}})
    cfg.loss.label_smoothing = 0.7  # changed after loading: the check sees it too
    with pytest.raises(ConfigError, match=want):
        check_values(cfg)
    assert "loss.label_smoothing" not in resume_may_change(my)


def test_an_unknown_extension_is_one_line_naming_the_key(tiny_root, tmp_path, registries):
    cfg = tiny_config(tiny_root, tmp_path, extensions=["no_such_module_here"])
    with pytest.raises(ConfigError, match=r"^command line: extensions\[0\]: no module "):
        check_config(cfg)
    cfg = tiny_config(tiny_root, tmp_path, extensions=["missing.py"])
    with pytest.raises(ConfigError, match=r"^command line: extensions\[0\]: no file .*missing"):
        check_config(cfg)
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('half-written')\n")
    cfg = tiny_config(tiny_root, tmp_path, extensions=[str(broken)])
    with pytest.raises(ConfigError, match=r"extensions\[0\]: importing .*RuntimeError: half"):
        check_config(cfg)
    needs = tmp_path / "needs.py"
    needs.write_text("import no_such_dependency_here\n")
    sys.path.insert(0, str(tmp_path))
    try:  # the extension exists; what it imports does not: not "no module 'needs'"
        cfg = tiny_config(tiny_root, tmp_path, extensions=["needs"])
        with pytest.raises(ConfigError, match=r"importing 'needs' failed: ModuleNotFound"):
            check_config(cfg)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("needs", None)


def test_a_py_extension_is_saved_as_an_absolute_path(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, tmp_path, extensions=["my_extensions.py", "my_pkg.losses"])
    assert cfg.extensions == [str(tmp_path / "my_extensions.py"), "my_pkg.losses"]


def test_an_extension_is_imported_once(tiny_root, tmp_path, registries):
    pkg = tmp_path / "my_ext_pkg.py"
    pkg.write_text(
        "from bonecomp.losses import register_loss\n"
        "register_loss('twice_safe', lambda cfg: (lambda logits, batch: logits.mean()))\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        cfg = tiny_config(tiny_root, tmp_path, extensions=["my_ext_pkg", str(pkg)])
        with pytest.raises(ConfigError, match="already registered"):
            check_config(cfg)  # the same code as a module and as a file: two registrations
        cfg = tiny_config(tiny_root, tmp_path, extensions=["my_ext_pkg"])
        check_config(cfg)
        check_config(cfg)  # a second check imports nothing again
    finally:
        sys.path.remove(str(tmp_path))


def test_the_scripts_import_the_recipes_extensions(tiny_root, tmp_path):
    """train.py in its own process: the registered term reaches summary.csv."""
    module = tmp_path / "ext.py"
    module.write_text(
        "import torch.nn.functional as F\n"
        "from bonecomp.losses import register_loss\n"
        "@register_loss('plain_bce')\n"
        "def plain_bce(cfg):\n"
        "    return lambda y, batch: F.binary_cross_entropy_with_logits(y, batch['mask'])\n"
    )
    extra = {"extensions": [str(module)], "loss.terms": {"plain_bce": 1.0}, "train.epochs": 1}
    args = tiny_overrides(tiny_root, tmp_path, **extra)
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--config",
           str(REPO / "configs" / "demo.yaml"), "--fold", "0", "--quiet", *args]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = pd.read_csv(tmp_path / "runs" / "tiny" / "fold0" / "summary.csv")
    assert "loss_plain_bce" in summary
    # and without the module, the same recipe is refused in one line before any work
    bad = [a for a in args if not a.startswith("extensions=")] + as_overrides(
        {"train.experiment": "other"}
    )
    cmd = [*cmd[:6], "--quiet", *bad]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "loss.terms: unknown loss term 'plain_bce'; valid: bce, dice," in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs" / "other").exists()


PARSES_ARGV = """import argparse
ap = argparse.ArgumentParser()
ap.add_argument("--scale", type=float, default=1.0)
SCALE = ap.parse_args().scale
"""


@pytest.mark.parametrize(
    "body, says",
    [
        ("import sys\nsys.exit(0)\n", r"ended the program \(sys\.exit\(0\)\)"),
        (PARSES_ARGV, r"ended the program \(sys\.exit\(2\)\): .*unrecognized arguments: --config"),
    ],
    ids=["sys.exit(0)", "parses sys.argv"],
)
def test_an_extension_that_ends_the_program_at_import_is_blamed_on_it(
    body, says, tiny_root, tmp_path, registries, monkeypatch, capsys
):
    """A module that exits, or parses the script's own arguments, while it is imported:
    one line naming ``extensions[0]``, exit 2, before any work (not a silent exit 0, not
    argparse's complaint about train.py's arguments)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import train as train_script

    module = tmp_path / "ext.py"
    module.write_text(body)
    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--fold", "0", "--quiet"]
    args += tiny_overrides(tiny_root, tmp_path, extensions=[str(module)])
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    assert train_script.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: command line: extensions[0]: importing ") and "\n" not in err
    assert re.search(says, err), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
