"""Encoders that timm builds for one input size (ViT, Swin, BEiT, ConViT...): either they
get ``dynamic_img_size`` and run at the recipe's size and every TTA scale, or the config
check refuses the size in one line before any work (the forward pass would assert)."""

from __future__ import annotations

from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch

from bonecomp.checks import check_config
from bonecomp.classes import NUM_CLASSES
from bonecomp.config import ConfigError, ModelConfig, load_config
from bonecomp.models import create_model

BASE = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"
FIXED = "tu-convit_tiny"  # strict 224 px patch embedding, no dynamic_img_size in timm


@pytest.mark.parametrize(
    "arch, encoder",
    [("fcn8s", "tu-swin_tiny_patch4_window7_224"), ("dpt", "tu-vit_tiny_patch16_224")],
)
def test_a_fixed_size_timm_encoder_runs_at_the_recipes_size_and_tta_scales(arch, encoder):
    """The issue's pairs at another size than timm's 224 (64 px, and 96 px from the 1.5
    scale, to stay quick on CPU): accepted by the check, and the forward pass runs."""
    overrides = [f"model.arch={arch}", f"model.encoder={encoder}", "model.encoder_weights=null"]
    cfg = load_config(BASE, [*overrides, "data.image_size=64", "infer.scales=[1.0, 1.5]"])
    check_config(cfg)
    model = create_model(ModelConfig(arch=arch, encoder=encoder, encoder_weights=None)).eval()
    with torch.no_grad():
        for side in (64, 96):  # 64 * 1.5, a multiple of 32
            assert model(torch.rand(1, 3, side, side)).shape[-2:] == (side, side)


def test_the_encoder_refused_below_fails_in_the_forward_pass_at_another_size():
    """Why it is refused: timm's own model asserts on a 64 px input (no bonecomp code)."""
    net = timm.create_model(FIXED[3:], pretrained=False).eval()
    with pytest.raises(AssertionError, match="doesn't match model"), torch.no_grad():
        net(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize(
    "overrides, key, asked",
    [
        (["data.image_size=64"], "data.image_size", 64),
        (["data.image_size=224", "infer.scales=[1.0, 1.5]"], "infer.scales[1]", 320),
        (
            ["data.image_size=224", "infer.sliding_window=true", "infer.tile=128"],
            "infer.tile",
            128,
        ),
    ],
)
def test_a_size_a_fixed_size_encoder_cannot_take_is_refused_at_the_check(overrides, key, asked):
    cfg = load_config(BASE, ["model.arch=unet", f"model.encoder={FIXED}", *overrides])
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    msg = str(info.value)
    assert msg.startswith(f"command line: {key}") and "\n" not in msg, msg
    assert "model.encoder" in msg and FIXED in msg, msg
    assert "224x224" in msg and f"{asked}x{asked}" in msg, msg
    assert info.value.key == key


def test_a_fixed_size_encoder_at_its_own_size_passes():
    check_config(load_config(BASE, ["model.arch=unet", f"model.encoder={FIXED}",
                                    "data.image_size=224", "infer.scales=[1.0]"]))  # fmt: skip


def test_checkpoints_of_the_fixed_size_build_load_and_predict_the_same():
    """``dynamic_img_size`` changes no weight: a model built as before (plain smp, at
    timm's fixed 224) loads strictly and gives the same logits at 224."""
    torch.manual_seed(0)
    old = smp.DPT("tu-vit_tiny_patch16_224", encoder_weights=None, classes=NUM_CLASSES).eval()
    cfg = ModelConfig(arch="dpt", encoder="tu-vit_tiny_patch16_224", encoder_weights=None)
    new = create_model(cfg.model_copy(update={"init_bias": None})).eval()
    new.net.load_state_dict(old.state_dict(), strict=True)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(new.net(x), old(x))
