"""Every architecture of the registry passes the same checks; FCN strides; weights; an
architecture registered from outside the package is checked, built and trained."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from segmentation_models_pytorch.base import SegmentationHead, SegmentationModel
from segmentation_models_pytorch.encoders import get_encoder

from bonecomp import models
from bonecomp.checks import check_config
from bonecomp.config import ConfigError, ModelConfig, load_config
from bonecomp.models import SegModel, arch_names, check_model_config, create_model, register_arch
from bonecomp.models import encoder_weights as weights_mod
from bonecomp.models.encoder_weights import WeightsError

# DPT only accepts timm ViT encoders; PAN needs larger inputs than the others.
SHARED = [a for a in arch_names() if a != "dpt"]


@pytest.fixture(params=SHARED, scope="module")
def model(request):
    torch.manual_seed(0)
    return create_model(ModelConfig(arch=request.param, encoder="resnet18", encoder_weights=None))


class TestEveryArchitecture:
    """The same shape / backward / eval checks for each architecture (smp-style base)."""

    @pytest.fixture
    def size(self, model):
        return (192, 160) if type(model.net).__name__ == "PAN" else (128, 96)

    def test_forward_shape(self, model, size):
        model.train()
        y = model(torch.rand(2, 3, *size))
        assert y.shape == (2, 29, *size)

    def test_backward_reaches_encoder_and_head(self, model, size):
        model.train()
        model.zero_grad()
        model(torch.rand(2, 3, *size)).mean().backward()
        first = next(p for p in model.net.encoder.parameters() if p.requires_grad)
        assert first.grad is not None and first.grad.abs().sum() > 0
        assert model.output_bias.grad is not None

    def test_eval_is_deterministic_and_starts_at_the_prior(self, model, size):
        model.eval()
        x = torch.rand(1, 3, *size)
        with torch.no_grad():
            a, b = model(x), model(x)
        assert torch.equal(a, b)
        assert torch.allclose(model.output_bias, torch.full_like(model.output_bias, -4.0))


def test_timm_universal_encoder():
    model = create_model(ModelConfig(arch="unet", encoder="tu-resnet10t", encoder_weights=None))
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 29, 64, 64)


def test_timm_encoder_names_may_carry_a_weights_tag():
    model = create_model(
        ModelConfig(arch="unet", encoder="tu-resnet18.a1_in1k", encoder_weights=None)
    )
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 29, 64, 64)
    with pytest.raises(ValueError, match=r"no weights tagged 'bogus' for resnet18.*a1_in1k"):
        create_model(ModelConfig(arch="unet", encoder="tu-resnet18.bogus", encoder_weights=None))
    with pytest.raises(ValueError, match="unknown timm encoder"):
        create_model(
            ModelConfig(arch="unet", encoder="tu-resnet*", encoder_weights=None)
        )  # not a pattern


def test_fcn_on_a_timm_encoder_uses_its_stride8_features():
    cfg = ModelConfig(arch="fcn8s", encoder="tu-resnet18", encoder_weights=None, init_bias=None)
    model = create_model(cfg)
    assert type(model.net.encoder).__name__ == "TimmUniversalEncoder"
    y = model(torch.rand(2, 3, 96, 64))
    assert y.shape == (2, 29, 96, 64)
    y.square().mean().backward()
    assert model.net.decoder.score["8"].weight.grad.abs().sum() > 0


def test_fcn_refuses_encoders_without_stride_8_16_32_features(monkeypatch):
    with pytest.raises(ValueError, match=r"model.encoder 'tu-vit_tiny_patch16_224' cannot feed"):
        create_model(ModelConfig(arch="fcn8s", encoder="tu-vit_tiny_patch16_224"))
    assert create_model(
        ModelConfig(arch="unet", encoder="resnet18", encoder_weights=None)
    )  # other heads unaffected

    class NoStride8(torch.nn.Module):
        out_channels = (3, 64, 64, 0, 256, 512)
        output_stride = 32

    monkeypatch.setattr(models, "_get_encoder", lambda name, weights: NoStride8())  # the FCN check
    with pytest.raises(ValueError, match=r"no features at strides \[8\]"):
        create_model(ModelConfig(arch="fcn8s", encoder="resnet18", encoder_weights=None))
    create_model(
        ModelConfig(arch="fcn16s", encoder="resnet18", encoder_weights=None)
    )  # strides 16, 32 suffice


@pytest.mark.parametrize("arch", ["fcn32s", "fcn16s", "fcn8s"])
@pytest.mark.parametrize("upsample", ["bilinear", "learned"])
def test_fcn_variants(arch, upsample):
    model = create_model(
        ModelConfig(arch=arch, encoder="resnet18", fcn_upsample=upsample, encoder_weights=None)
    )
    strides = {"fcn32s": ["32"], "fcn16s": ["32", "16"], "fcn8s": ["32", "16", "8"]}[arch]
    assert list(model.net.decoder.score) == strides
    for size in [(64, 64), (96, 160)]:
        assert model(torch.rand(2, 3, *size)).shape == (2, 29, *size)


def test_fcn8s_uses_the_stride8_features():
    model = create_model(
        ModelConfig(arch="fcn8s", encoder="resnet18", init_bias=None, encoder_weights=None)
    )
    model(torch.rand(2, 3, 64, 64)).square().mean().backward()
    assert model.net.decoder.score["8"].weight.grad.abs().sum() > 0


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="fcn8s"):
        create_model(ModelConfig(arch="segnet"))
    with pytest.raises(ValueError, match="resnet34"):
        create_model(ModelConfig(encoder="resnet35"))


def test_local_weights_file_loads_into_the_encoder(tmp_path):
    torch.manual_seed(1)
    donor = create_model(ModelConfig(arch="unet", encoder="resnet18", encoder_weights=None))
    path = tmp_path / "enc.pth"
    torch.save(
        {"state_dict": {f"encoder.{k}": v for k, v in donor.net.encoder.state_dict().items()}}, path
    )
    torch.manual_seed(2)
    model = create_model(ModelConfig(arch="fcn8s", encoder="resnet18", encoder_weights=str(path)))
    for k, v in donor.net.encoder.state_dict().items():
        assert torch.equal(model.net.encoder.state_dict()[k], v), k


def test_bad_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="not a file"):
        create_model(ModelConfig(encoder="resnet18", encoder_weights=str(tmp_path / "none.pth")))
    path = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="no tensor matches"):
        create_model(ModelConfig(encoder="resnet18", encoder_weights=str(path)))


def test_imagenet_offline_fails_fast_naming_alternatives(monkeypatch):
    monkeypatch.setattr(weights_mod, "reachable", lambda *a, **kw: False)
    with pytest.raises(WeightsError) as e:
        create_model(ModelConfig(encoder="resnet18", encoder_weights="imagenet"))
    msg = str(e.value)
    assert "encoder_weights=null" in msg and "local file" in msg and "unreachable" in msg


def test_normalisation_lives_in_the_model():
    model = create_model(ModelConfig(encoder="resnet18", encoder_weights=None))
    assert isinstance(model, SegModel)
    assert {"mean", "std"} <= set(dict(model.named_buffers()))


def test_fcn_keeps_the_state_dict_keys_of_old_checkpoints():
    """FCN is an smp SegmentationModel now; its keys are those of the stand-alone FCN that
    wrote existing run folders (encoder.*, decoder.score.*, decoder.up.*)."""
    cfg = ModelConfig(
        arch="fcn8s", encoder="resnet18", fcn_upsample="learned", encoder_weights=None
    )
    keys = set(create_model(cfg).state_dict())
    encoder = {f"net.encoder.{k}" for k in models._get_encoder("resnet18", None).state_dict()}
    head = {f"net.decoder.score.{s}.{p}" for s in (32, 16, 8) for p in ("weight", "bias")}
    head |= {f"net.decoder.up.{i}.conv.weight" for i in range(3)}
    assert keys == encoder | head | {"mean", "std"}


# --- an architecture registered from outside the package --------------------------------


class _LastFeatures(torch.nn.Module):
    """Decoder: the deepest features, upsampled back to the input size."""

    def forward(self, features):
        return torch.nn.functional.interpolate(features[-1], size=features[0].shape[-2:])


class TinyNet(SegmentationModel):
    """A depth-3 smp-style model, not one the package knows."""

    def __init__(self, encoder_name, encoder_weights, classes):
        super().__init__()
        self.encoder = get_encoder(encoder_name, depth=3, weights=encoder_weights)
        self.decoder = _LastFeatures()
        self.segmentation_head = SegmentationHead(self.encoder.out_channels[-1], classes, 1)
        self.classification_head = None


@pytest.fixture
def tinynet(registries):
    """``tinynet`` registered as user code would, in a registry restored afterwards."""
    calls = []

    @register_arch("tinynet", output_stride=64)  # stricter than it needs
    def build(cfg, classes, encoder_weights):
        calls.append((cfg.encoder, classes, encoder_weights))
        return TinyNet(cfg.encoder, encoder_weights, classes)

    return calls


def test_registered_arch_passes_the_config_check_with_its_stride(tinynet):
    base = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"
    check_config(load_config(base, ["model.arch=tinynet", "data.image_size=128"]))
    with pytest.raises(ConfigError, match=r"data\.image_size: 96 is not a multiple of 64"):
        check_config(load_config(base, ["model.arch=tinynet", "data.image_size=96"]))
    check_model_config(ModelConfig(arch="unet"), 96)  # the other archs keep their own stride
    assert "tinynet" in arch_names()


def test_registered_arch_is_built_trained_and_reloaded(tinynet, tmp_path):
    cfg = ModelConfig(arch="TinyNet", encoder="resnet18", encoder_weights=None)
    model = create_model(cfg)
    assert tinynet == [("resnet18", 29, None)] and isinstance(model.net, TinyNet)
    assert torch.allclose(model.output_bias, torch.full_like(model.output_bias, -4.0))
    x = torch.rand(2, 3, 72, 72)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model(x).detach()
    model(x).square().mean().backward()
    opt.step()
    assert model(x).shape == (2, 29, 72, 72) and not torch.equal(model(x).detach(), before)
    fresh = create_model(cfg)  # as inference rebuilds it from the saved config
    fresh.load_state_dict(model.state_dict())
    assert len(tinynet) == 2 and torch.equal(fresh.eval()(x), model.eval()(x))


def test_unknown_arch_is_refused_in_one_wording_listing_registered_ones(tinynet):
    with pytest.raises(ConfigError) as checked:
        check_model_config(ModelConfig(arch="tinynet2"), 512)
    with pytest.raises(ConfigError) as built:
        create_model(ModelConfig(arch="tinynet2"))
    assert checked.value.key == built.value.key == "model.arch"
    assert str(checked.value) == str(built.value)
    assert re.search(
        r"^model\.arch: unknown architecture 'tinynet2'; valid: fcn32s, .*fcn8s, .*tinynet$",
        str(built.value),
    )
    with pytest.raises(ValueError, match="already registered"):
        register_arch("tinynet", lambda *a: None)
