"""The whole config checked against the registries before any expensive work."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bonecomp.checks import check_config
from bonecomp.config import ConfigError, ModelConfig, load_config
from bonecomp.models import check_model_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
BASE = CONFIGS[0].parent / "base.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_recipes_pass(path):
    check_config(load_config(path))


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.arch=segnet", "model.arch"),
        ("model.encoder=resnet35", "model.encoder"),
        ("model.encoder=tu-no_such_model_xyz", "model.encoder"),
        ("loss.terms={bce: 1, dicee: 1}", "loss.terms"),
        # The weights' rule is losses.check_loss_config's alone (moved from test_config).
        ("loss.terms={bce: -1, dice: 1}", "loss.terms"),
        ("loss.terms={bce: 0}", "loss.terms"),
        ("train.optimizer=adamx", "train.optimizer"),
        ("infer.tta=[none, rot45]", "infer.tta[1]"),
    ],
)
def test_registry_names_are_checked_with_their_source(override, key):
    cfg = load_config(BASE, [override])  # loads: types and ranges are fine
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    msg = str(info.value)
    assert msg.startswith(f"command line: {key}") and "\n" not in msg, msg
    assert info.value.key == key


def test_value_rules_run_too():
    cfg = load_config(BASE)
    cfg.train.epochs = 0  # changed after loading, e.g. by a script
    with pytest.raises(ConfigError, match=r"train\.epochs must be >= 1"):
        check_config(cfg)


def test_errors_name_the_recipe_file(tmp_path):
    (tmp_path / "r.yaml").write_text("extends: base.yaml\nmodel: {encoder: resnet35}\n")
    (tmp_path / "base.yaml").write_text(BASE.read_text())
    with pytest.raises(ConfigError, match=r"^\S*r\.yaml: model\.encoder: unknown"):
        check_config(load_config(tmp_path / "r.yaml"))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"^model\.arch: unknown architecture 'segnet'; valid: .*fcn8s, unet,"
    ):
        check_model_config(ModelConfig(arch="segnet"), 512)
    with pytest.raises(ConfigError, match=r"valid smp encoders: \[.*'resnet34'"):
        check_model_config(ModelConfig(encoder="resnet35"), 512)


def test_model_checked_without_building_it():
    t0 = time.perf_counter()
    check_model_config(ModelConfig(arch="unetplusplus", encoder="efficientnet-b7"), 1024)
    check_model_config(ModelConfig(arch="fcn8s", encoder="tu-resnet10t"), 512)
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize(
    "arch, encoder, size, ok",
    [
        ("unet", "resnet18", 512, True),
        ("unet", "resnet18", 496, False),  # 496 = 16 x 31: the U-Net needs /32
        ("fcn8s", "resnet18", 528, False),
        ("dpt", "tu-vit_base_patch16_224", 512, True),
        ("dpt", "tu-vit_small_patch14_dinov2", 512, False),  # 512 % 14
        ("dpt", "tu-vit_small_patch14_dinov2", 448, True),
    ],
)
def test_input_size_must_fit_the_output_stride(arch, encoder, size, ok):
    cfg = ModelConfig(arch=arch, encoder=encoder)
    if ok:
        check_model_config(cfg, size)
    else:
        with pytest.raises(ConfigError, match=rf"data\.image_size: {size} is not a multiple"):
            check_model_config(cfg, size)
