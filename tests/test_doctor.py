"""The doctor: every check reported on CPU, broken items fail naming the culprit, a check
that raises becomes one fail row, and the exit code follows the failures."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from bonecomp import doctor
from bonecomp.checks import check_config
from bonecomp.config import load_config
from bonecomp.data.layout import discover
from bonecomp.distributed import Dist
from bonecomp.models import create_model
from bonecomp.models import encoder_weights as weights_mod
from bonecomp.testing import tiny_config
from bonecomp.training.data import prepare_cache
from tests.test_sample import distance_example, record_term

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
NAMES = [name for name, _ in doctor.CHECKS]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only lines")


def overrides(root: Path, work: Path, **extra: str) -> list[str]:
    values = {
        "data.root": str(root),
        "data.image_size": "64",
        "data.cache_dir": str(work / "cache"),
        "data.num_workers": "0",
        "train.output_dir": str(work / "runs"),
        "train.batch_size": "2",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def run_script(args: list[str], capsys) -> tuple[int, dict[str, tuple[str, str]]]:
    """Exit code and {check: (status, message)} from the printed table."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import doctor as doctor_script

    code = doctor_script.main(["--config", str(DEMO), "--quick", *args])
    out = capsys.readouterr().out
    table = {}
    for line in out.splitlines():
        name = next((n for n in NAMES if line.startswith(f"{n} ")), None)
        if name is not None:
            status, _, msg = line[len(name) :].strip().partition(" ")
            table[name] = (status, msg.strip())
    return code, table


@no_cuda
def test_cpu_table_has_every_check_and_exits_0(tiny_root, tmp_path, capsys):
    code, table = run_script(overrides(tiny_root, tmp_path), capsys)
    assert list(table) == NAMES
    assert code == 0
    assert all(status in ("ok", "warn") for status, _ in table.values()), table
    assert "no GPU" in table["gpu"][1] and "no GPU" in table["cuda rle"][1]
    assert table["amp step"][0] == "ok" and "finite" in table["amp step"][1]
    assert "img/s" in table["channels_last"][1] and "samples/s" in table["data loader"][1]
    assert table["process group"] == ("ok", table["process group"][1])
    assert "gloo" in table["process group"][1]
    assert not (tmp_path / "cache").exists()  # the loader check builds its cache elsewhere


def test_missing_encoder_weights_file_fails_naming_it(tiny_root, tmp_path, capsys):
    bad = "/nonexistent.pth"
    code, table = run_script(
        overrides(tiny_root, tmp_path, **{"model.encoder_weights": bad}), capsys
    )
    assert code == 1
    assert table["encoder weights"][0] == "fail" and bad in table["encoder weights"][1]
    assert [n for n, (s, _) in table.items() if s == "fail"] == ["encoder weights"]


def test_missing_data_warns_with_the_path(tmp_path, capsys):
    missing = tmp_path / "no_data_here"
    code, table = run_script(overrides(missing, tmp_path), capsys)
    assert code == 0
    status, msg = table["data loader"]
    assert status == "warn" and str(missing) in msg and "make_phantom" in msg
    assert "800" in table["cache disk"][1]  # sized for the competition's count


def test_a_check_that_raises_is_one_fail_row(tiny_root, tmp_path, monkeypatch):
    def broken(probe):
        raise RuntimeError("boom\nsecond line of a long traceback-like message")

    checks = [(n, broken if n == "process group" else c) for n, c in doctor.CHECKS]
    checks = [(n, c) for n, c in checks if n in ("torch", "process group", "encoder weights")]
    monkeypatch.setattr(doctor, "CHECKS", checks)
    cfg = load_config(DEMO, overrides(tiny_root, tmp_path))
    rows = doctor.run_checks(cfg, quick=True)
    assert [r.name for r in rows] == ["torch", "process group", "encoder weights"]
    assert rows[1] == doctor.Row("process group", "fail", "RuntimeError: boom")
    assert rows[0].status == rows[2].status == "ok"
    assert doctor.exit_code(rows) == 1 and doctor.exit_code([rows[0]]) == 0
    table = doctor.format_table(rows)
    assert "RuntimeError: boom" in table and "second line" not in table
    assert table.splitlines()[-1] == "2 ok, 0 warn, 1 fail"


def test_encoder_weights_file_that_loads_is_ok(tiny_root, tmp_path):
    cfg = load_config(DEMO, overrides(tiny_root, tmp_path))
    path = tmp_path / "enc.pth"
    torch.save(create_model(cfg.model).net.encoder.state_dict(), path)
    cfg.model.encoder_weights = str(path)
    row = doctor.check_encoder_weights(doctor.Probe(cfg, torch.device("cpu")))
    assert row.status == "ok" and str(path) in row.message
    torch.save({"unrelated.weight": torch.zeros(3)}, path)
    row = doctor.check_encoder_weights(doctor.Probe(cfg, torch.device("cpu")))
    assert row.status == "fail" and str(path) in row.message


@pytest.mark.parametrize("online", [True, False])
def test_imagenet_weights_ok_when_reachable_else_fail_with_advice(
    tiny_root, tmp_path, monkeypatch, online
):
    for module in (weights_mod, doctor):  # the hub cache is empty in tests: no download
        monkeypatch.setattr(module, "reachable", lambda *a, **kw: online)
    cfg = load_config(DEMO, overrides(tiny_root, tmp_path, **{"model.encoder_weights": "imagenet"}))
    row = doctor.check_encoder_weights(doctor.Probe(cfg, torch.device("cpu")))
    if online:
        assert row.status == "ok" and "reachable" in row.message
    else:
        assert row.status == "fail" and "encoder_weights=null" in row.message


@pytest.mark.parametrize(("ratio", "status"), [(0.9, "fail"), (1.1, "warn"), (1.5, "ok")])
def test_cache_disk_compares_free_space_with_the_need(
    tiny_root, tmp_path, monkeypatch, ratio, status
):
    cfg = load_config(DEMO, overrides(tiny_root, tmp_path))
    need = 10 * doctor.bytes_per_image(64)  # the tiny phantom has 10 training images
    usage = shutil.disk_usage(tmp_path)._replace(free=int(ratio * need))
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: usage)
    row = doctor.check_cache_disk(doctor.Probe(cfg, torch.device("cpu")))
    assert row.status == status, row
    assert "10 training images" in row.message
    if status == "fail":
        assert "data.cache_dir" in row.message


# A crop recipe and a CLAHE recipe: their caches are not ``train_<size>``.
RECIPES = {
    "crop": ({"data.crop": "carpal", "data.crop_margin": 0.3}, "train_64_carpal-m0.3"),
    "clahe": ({"data.preprocess": ["clahe"], "data.clahe_clip": 3.0}, "train_64_clahe-3-8"),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_cache_disk_names_the_folder_training_builds(tiny_root, tmp_path, recipe):
    """The disk check looks at the folder training builds for the recipe (crop and
    preprocessing in its name): once training built it, the row says so, naming it."""
    extra, name = RECIPES[recipe]
    cfg = tiny_config(tiny_root, tmp_path, **extra)
    probe = doctor.Probe(cfg, torch.device("cpu"))
    assert "already built" not in doctor.check_cache_disk(probe).message
    _, cache = prepare_cache(cfg, discover(tiny_root, "train"), Dist(), False)
    assert cache.dir.name == name  # the folder names of existing caches stay
    row = doctor.check_cache_disk(probe)
    assert (row.status, row.message) == ("ok", f"{cache.dir} already built")


def test_channels_last_warns_when_the_configured_format_is_slower(tiny_root, tmp_path):
    cfg = load_config(DEMO, overrides(tiny_root, tmp_path, **{"train.channels_last": "true"}))
    probe = doctor.Probe(cfg, torch.device("cpu"), quick=True)
    probe._speed = {False: 10.0, True: 5.0}  # measured: NCHW twice as fast
    row = doctor.check_channels_last(probe)
    assert row.status == "warn" and "set false" in row.message
    cfg.train.channels_last = False
    assert doctor.check_channels_last(probe).status == "ok"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_table_checks_amp_rle_and_nccl(tiny_root, tmp_path):
    cfg = load_config(DEMO, overrides(tiny_root, tmp_path, **{"train.batch_size": "4"}))
    rows = {r.name: r for r in doctor.run_checks(cfg)}
    assert all(r.status != "fail" for r in rows.values()), rows
    assert "GiB" in rows["gpu"].message and "peak" in rows["amp step"].message
    assert "batch 4 (train.batch_size)" in rows["amp step"].message
    assert "identical" in rows["cuda rle"].message and "nccl" in rows["process group"].message


def test_a_patch_recipe_steps_on_patch_items_with_the_loss_fields(tiny_root, tmp_path, registries):
    """The doctor's step is training's: patch-size items of the training dataset, with
    the sample field the recipe's loss reads (docs/extending.md's distance example)."""
    example = distance_example(tmp_path)
    extra = {"data.patch_size": "32", "extensions": f"[{example['extensions'][0]}]",
             "loss.terms": str(example["loss.terms"])}  # fmt: skip
    cfg = load_config(DEMO, overrides(tiny_root, tmp_path, **extra))
    check_config(cfg)  # what scripts/doctor.py does first: imports the extension
    seen: list[dict] = []
    record_term("boundary", seen)
    wanted = ("amp step", "channels_last", "data loader")
    checks = [(n, c) for n, c in doctor.CHECKS if n in wanted]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(doctor, "CHECKS", checks)
        rows = {r.name: r for r in doctor.run_checks(cfg)}  # batch 2: 1 x 1 features batch-norm
    assert all(r.status != "fail" for r in rows.values()), rows
    amp = rows["amp step"].message
    assert "batch 2 x 32 px patches of 64 px images (training items with distance)" in amp
    assert "finite" in amp
    assert "32 px patches of 64 px images" in rows["channels_last"].message
    assert "32 px patches of 64 px images" in rows["data loader"].message
    assert seen and all(b["training"] for b in seen)
    for b in seen:  # the field reached the loss at the patch's size, next to the mask
        assert b["image"].shape[-2:] == (32, 32) and b["origin"].shape[-1] == 2
        assert b["distance"].shape == b["mask"].shape == (b["mask"].shape[0], 29, 32, 32)
    assert not list(tmp_path.glob("cache"))  # the doctor's cache was temporary
