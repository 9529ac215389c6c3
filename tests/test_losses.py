"""Loss values on known cases, and the registry of named terms."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import segmentation_models_pytorch as smp
import torch

from bonecomp.config import ConfigError, LossConfig
from bonecomp.losses import TERMS, build_loss, register_loss, soft_dice_loss
from bonecomp.testing import tiny_config
from bonecomp.training import run_training


def test_bce_of_zero_logits_is_log2():
    loss, parts = build_loss(LossConfig(terms={"bce": 1.0}))(
        torch.zeros(2, 3, 4, 4), {"mask": torch.ones(2, 3, 4, 4)}
    )
    assert loss.item() == pytest.approx(math.log(2))
    assert parts == {"loss_bce": pytest.approx(math.log(2))}


def test_perfect_prediction_has_near_zero_dice_loss():
    target = torch.zeros(2, 3, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    logits = (target * 2 - 1) * 50
    assert soft_dice_loss(logits, target, smooth=1e-6).item() == pytest.approx(0, abs=1e-6)


def test_dice_hand_computed():
    # p = 0.5 everywhere, target half ones: inter = 0.5*8 = 4, denom = 8 + 8 = 16
    logits = torch.zeros(1, 1, 4, 4)
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    assert soft_dice_loss(logits, target, smooth=0).item() == pytest.approx(1 - 8 / 16)


def test_over_batch_differs_from_per_image_with_empty_class():
    logits = torch.full((2, 1, 4, 4), -3.0)
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2] = 1  # image 1 has none of the class
    per_image = soft_dice_loss(logits, target, 1.0, over_batch=False)
    batch = soft_dice_loss(logits, target, 1.0, over_batch=True)
    assert per_image.item() != pytest.approx(batch.item())


def test_our_dice_penalises_a_class_absent_from_the_batch_unlike_smp():
    """Why ``dice`` stays ours: smp's DiceLoss gives 0 for false positives of a class
    that no image of the batch has."""
    logits = torch.full((2, 1, 8, 8), 3.0)  # confident foreground everywhere
    target = torch.zeros(2, 1, 8, 8)
    theirs = smp.losses.DiceLoss("multilabel", from_logits=True)(logits, target)
    ours = build_loss(LossConfig(terms={"dice": 1.0}))(logits, {"mask": target})[0]
    assert theirs.item() == 0 and ours.item() > 0.9


def test_default_is_the_old_bce_dice_sum_with_soft_targets():
    logits = torch.randn(2, 3, 8, 8)
    target = torch.rand(2, 3, 8, 8)  # soft coverage
    loss, parts = build_loss(LossConfig())(logits, {"mask": target})
    assert set(parts) == {"loss_bce", "loss_dice"}
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    want = 0.5 * bce + 0.5 * soft_dice_loss(logits, target, 1.0, True)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert parts["loss_bce"] == pytest.approx(bce.item(), rel=1e-6)


def test_weighted_sum_of_named_parts():
    logits = torch.randn(2, 3, 8, 8)
    target = (torch.rand(2, 3, 8, 8) > 0.5).float()
    terms = {"bce": 0.3, "dice": 0.7, "focal": 2.0}
    loss, parts = build_loss(LossConfig(terms=terms))(logits, {"mask": target})
    assert set(parts) == {f"loss_{t}" for t in terms}
    want = sum(w * parts[f"loss_{t}"] for t, w in terms.items())
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_zero_weight_drops_the_term():
    _, parts = build_loss(LossConfig(terms={"bce": 0.0, "dice": 1.0}))(
        torch.zeros(1, 2, 4, 4), {"mask": torch.ones(1, 2, 4, 4)}
    )
    assert set(parts) == {"loss_dice"}


@pytest.mark.parametrize("term", sorted(TERMS))
def test_every_term_is_finite_differentiable_and_lower_when_right(term):
    torch.manual_seed(0)
    target = torch.zeros(2, 29, 16, 16)
    target[:, :, 4:12, 4:12] = 1
    target[1, 3] = 0  # a class absent from one image
    good = ((target * 2 - 1) * 4).requires_grad_()
    bad = -good.detach()
    loss_fn = build_loss(LossConfig(terms={term: 1.0}))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loss still runs in float32
        loss, parts = loss_fn(good.bfloat16(), {"mask": target})
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert good.grad is not None and torch.isfinite(good.grad).all()
    assert parts[f"loss_{term}"] < loss_fn(bad, {"mask": target})[1][f"loss_{term}"]


def test_unknown_term_lists_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"^loss\.terms: unknown loss term 'dicee'; valid: bce, dice,"
    ):
        build_loss(LossConfig(terms={"dicee": 1.0}))


def test_all_weights_zero_rejected():
    with pytest.raises(ConfigError, match=r"loss\.terms"):
        build_loss(LossConfig(terms={"bce": 0.0, "dice": 0.0}))


# ------------------------------------------------------------- the weights, in a real run
class _GradientSeen(torch.autograd.Function):
    """Identity on a term's value that records the gradient the total sends back to it:
    d total / d term, the term's weight in the sum that is backpropagated."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, log: list) -> torch.Tensor:
        ctx.log = log
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.log.append(float(grad))
        return grad, None


def test_each_term_weighs_in_the_trained_total_as_configured(tiny_root, tmp_path, registries):
    """``loss.terms`` set on the command line, with a registered term of our own: in a
    real run every backward of the training step gives each term exactly its configured
    weight, and summary.csv's loss is the weighted sum of the terms it logs."""
    weights = {"bce": 0.3, "dice": 1.5, "sigmoid_mean": 0.7}
    # registered as a user does, and removed afterwards (the registries fixture)
    register_loss("sigmoid_mean", lambda c: lambda logits, batch: torch.sigmoid(logits).mean())
    seen: dict[str, list[float]] = {name: [] for name in weights}
    for name in weights:  # each built term wrapped to record its gradient
        build = TERMS.get(name).build

        def recording(cfg, build=build, log=seen[name]):
            term = build(cfg)
            return lambda logits, batch: _GradientSeen.apply(term(logits, batch), log)

        register_loss(name, recording, replace=True)
    cfg = tiny_config(tiny_root, tmp_path, **{"loss.terms": weights, "train.epochs": 1})
    result = run_training(cfg, 0, progress=False)
    for name, w in weights.items():
        assert seen[name] and seen[name] == pytest.approx([w] * len(seen[name]), rel=1e-6), name
    row = pd.read_csv(result.run_dir / "summary.csv").iloc[-1]
    want = sum(w * row[f"loss_{name}"] for name, w in weights.items())
    assert row["loss"] == pytest.approx(want, rel=1e-5)
