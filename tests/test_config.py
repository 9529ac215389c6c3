"""Config: YAML chains, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bonecomp.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.data.image_size % 32 == 0


def test_extends_merges_and_overrides_win(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {epochs: 3, lr: 0.1}\ndata: {exclude: [a]}\n")
    (tmp_path / "r.yaml").write_text("extends: base.yaml\ntrain: {epochs: 5}\n")
    cfg = load_config(tmp_path / "r.yaml", ["train.lr=0.5", "data.exclude=[b, c]"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.data.exclude) == (5, 0.5, ["b", "c"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epochz=3", "train.epochz"),
        ("train.epochs=three", "train.epochs must be int"),
        ("data.image_size=2.5", "data.image_size must be int"),
        ("model.encoder_weights=3", "model.encoder_weights"),
        ("nonsense", "key.sub=value"),
        ("infer.ensemble=[{experiment: a, foldz: [0]}]", "infer.ensemble[0].foldz"),
    ],
)
def test_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("train: {epochs: 1}\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*bogus"):
        load_config(tmp_path / "c.yaml")
