"""Config: one source of defaults, YAML chains, overrides, and errors that name the key
and where its value came from."""

from __future__ import annotations

import json
import math
import re
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import BaseModel, Field

from bonecomp.config import (
    RESUME,
    SCHEDULERS,
    SCHEMA_JSON,
    Config,
    ConfigError,
    Section,
    TrainConfig,
    base_yaml,
    check_values,
    config_from_saved,
    from_dict,
    load_config,
    resume_may_change,
    schema_json,
    source_of,
    to_dict,
    write_base_yaml,
    write_schema,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
BASE = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


def _section(tp: object) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _flatten(d: dict, cls: type[BaseModel] = Config, prefix: str = "") -> dict:
    """Dotted leaves; a mapping value (loss.terms) is one leaf, as in the models."""
    out = {}
    for k, v in d.items():
        tp = cls.model_fields[k].annotation if k in cls.model_fields else None
        if isinstance(v, dict) and _section(tp):
            out.update(_flatten(v, tp, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_base_yaml_lists_every_key_with_the_dataclass_default():
    base = yaml.safe_load(BASE.read_text())
    assert "extends" not in base
    in_yaml, defaults = _flatten(base), _flatten(to_dict(Config()))
    assert sorted(set(defaults) - set(in_yaml)) == [], "keys missing from base.yaml"
    assert sorted(set(in_yaml) - set(defaults)) == [], "base.yaml keys the models lack"
    differ = {k: (in_yaml[k], defaults[k]) for k in defaults if in_yaml[k] != defaults[k]}
    assert differ == {}, "base.yaml value != model default (yaml, model)"


def test_base_yaml_loads_to_the_defaults():
    assert load_config(BASE) == Config()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.data.image_size % 32 == 0


def test_extends_merges_sections_and_replaces_values(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "train: {epochs: 3, lr: 0.1}\ndata: {exclude: [a]}\nloss: {terms: {bce: 1, dice: 1}}\n"
    )
    (tmp_path / "r.yaml").write_text(
        "extends: base.yaml\ntrain: {epochs: 5}\nloss: {terms: {focal: 1}}\n"
    )
    cfg = load_config(tmp_path / "r.yaml", ["train.lr=0.5", "data.exclude=[b, c]"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.data.exclude) == (5, 0.5, ["b", "c"])
    assert cfg.loss.terms == {"focal": 1.0}  # a mapping value is replaced, not merged


def test_dotted_override_adds_a_loss_term(tmp_path):
    cfg = load_config(BASE, ["loss.terms.focal=0.2"])
    assert cfg.loss.terms == {"bce": 0.5, "dice": 0.5, "focal": 0.2}


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epochz=3", "train.epochz"),
        ("train.epochs=three", "train.epochs must be int"),
        ("data.image_size=2.5", "data.image_size must be int"),
        ("model.encoder_weights=3", "model.encoder_weights"),
        ("nonsense", "key.sub=value"),
        ("infer.ensemble=[{experiment: a, foldz: [0]}]", "infer.ensemble[0].foldz"),
        ("train.channels_last=maybe", "train.channels_last must be bool or 'auto'"),
        ("train.scheduler=cos", "train.scheduler must be one of"),
        ("model.fcn_upsample=nearest", "model.fcn_upsample must be one of"),
        ("loss.terms=[bce]", "loss.terms must be a mapping"),
        ("loss.terms={bce: x}", "loss.terms.bce must be float"),
        ("train.batch_size=auto", "got 'auto' .the effective batch.*train.micro_batch=auto"),
        ("train.micro_batch=fast", "train.micro_batch must be int or 'auto'"),
    ],
)
def test_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


@pytest.mark.parametrize("value, want", [("auto", "auto"), ("true", True), ("false", False)])
def test_channels_last_accepts_auto_true_false(value, want):
    assert load_config(None, [f"train.channels_last={value}"]).train.channels_last == want


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


def test_errors_say_where_the_value_came_from(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {epochs: 0}\n")
    (tmp_path / "r.yaml").write_text("extends: base.yaml\ntrain: {batch_size: 0}\n")
    with pytest.raises(ConfigError, match=r"^\S*r\.yaml: train\.batch_size must be >= 1, got 0$"):
        load_config(tmp_path / "r.yaml", ["train.epochs=2"])
    with pytest.raises(ConfigError, match=r"^\S*base\.yaml: train\.epochs must be >= 1"):
        load_config(tmp_path / "r.yaml", ["train.batch_size=2"])
    with pytest.raises(ConfigError, match=r"^command line: train\.epochs must be >= 1"):
        load_config(BASE, ["train.epochs=0"])
    with pytest.raises(ConfigError, match=r"^command line: train\.epochs must be int"):
        load_config(BASE, ["train.epochs=x"])  # a bad override is not blamed on the file
    with pytest.raises(ConfigError, match=r"^command line: infer\.ensemble\[0\]\.weight"):
        load_config(BASE, ["infer.ensemble=[{experiment: a, weight: 0}]"])
    cfg = load_config(tmp_path / "r.yaml", ["train.epochs=2", "train.batch_size=2"])
    assert source_of(cfg, "train.epochs") == "command line"
    assert source_of(cfg, "train.lr") == "default"


def test_old_loss_keys_get_the_new_form(tmp_path):
    (tmp_path / "old.yaml").write_text("loss: {bce_weight: 0.3, dice_weight: 0.7}\n")
    with pytest.raises(
        ConfigError, match=r"old\.yaml: loss\.bce_weight was replaced by loss\.terms"
    ):
        load_config(tmp_path / "old.yaml")


def test_saved_configs_of_older_versions_still_load():
    old = to_dict(Config())
    old["loss"] = {"bce_weight": 1.0, "dice_weight": 0.0, "dice_smooth": 1.0}
    old["train"]["channels_last"] = True
    cfg = config_from_saved(old, "ckpt.pt")
    assert cfg.loss.terms == {"bce": 1.0} and cfg.train.channels_last is True


# ------------------------------------------------------------------------- value rules
@pytest.mark.parametrize(
    "override, key",
    [
        ("train.batch_size=0", "train.batch_size"),
        ("train.epochs=0", "train.epochs"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-1e-3", "train.lr"),
        ("train.accum_steps=0", "train.accum_steps"),
        ("train.micro_batch=0", "train.micro_batch"),
        ("train.memory_fraction=1.5", "train.memory_fraction"),
        ("train.memory_fraction=0", "train.memory_fraction"),
        ("train.oof_size=0", "train.oof_size"),
        ("train.val_every=0", "train.val_every"),
        ("train.ema=1.0", "train.ema"),
        ("train.grad_clip=0", "train.grad_clip"),
        ("train.momentum=1.0", "train.momentum"),
        ("train.warmup_epochs=-1", "train.warmup_epochs"),
        ("train.warmup_epochs=50", "train.warmup_epochs"),  # longer than train.epochs
        ("train.min_lr=1.0", "train.min_lr"),  # above train.lr
        ("train.decay_rate=0", "train.decay_rate"),
        ("train.device=gpu", "train.device"),
        ("train.experiment=a/b", "train.experiment"),
        ("data.n_splits=1", "data.n_splits"),
        ("data.image_size=500", "data.image_size"),
        ("data.image_size=0", "data.image_size"),
        ("data.soft_k=0", "data.soft_k"),
        ("data.soft_k=16", "data.soft_k"),
        ("data.augment=flip", "data.augment"),
        ("infer.overlap=1.0", "infer.overlap"),
        ("infer.overlap=-0.1", "infer.overlap"),
        ("infer.threshold=0", "infer.threshold"),
        ("infer.threshold=1", "infer.threshold"),
        ("infer.tile=1000", "infer.tile"),
        ("infer.scales=[]", "infer.scales"),
        ("infer.device=cuda:x", "infer.device"),
        ("infer.tta=[hflip, hflip]", "infer.tta[1]"),
        ("infer.ensemble=[{experiment: a, weight: 0}]", "infer.ensemble[0].weight"),
        ("infer.ensemble=[{experiment: a, weight: -1}]", "infer.ensemble[0].weight"),
        ("infer.ensemble=[{experiment: a, folds: [5]}]", "infer.ensemble[0].folds"),
        ("infer.ensemble=[{experiment: a, folds: []}]", "infer.ensemble[0].folds"),
        ("infer.ensemble=[{experiment: a}, {experiment: a, folds: [0]}]", "infer.ensemble[1]"),
        # an experiment is one entry, also with another checkpoint: the OOF maps, tuned
        # thresholds and class-wise weights are kept per experiment (was refused by runs.py)
        (
            "infer.ensemble=[{experiment: a}, {experiment: a, checkpoint: last.pt}]",
            "infer.ensemble[1].experiment",
        ),
        ("train.lr=inf", "train.lr"),  # issue 19: non-finite floats are refused at the check
    ],
)
def test_values_out_of_range_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(BASE, [override])
    msg = str(info.value)
    assert msg.startswith(f"command line: {key}") and "\n" not in msg, msg
    assert info.value.key.startswith(key)


@pytest.mark.parametrize(
    "override",
    [
        "train.ema=0.999",
        "train.min_lr=1.0e-5",
        "train.device=cuda:1",  # checked when the device is picked, not here
        "infer.overlap=0",
        "infer.ensemble=[{experiment: a, folds: [0]}, {experiment: b, weight: 2}]",
        "loss.terms={bce: 0, dice: 1}",
    ],
)
def test_values_in_range_pass(override):
    load_config(BASE, [override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=inf", "train.lr"),
        ("train.lr=.nan", "train.lr"),
        ("train.pseudo_weight=.inf", "train.pseudo_weight"),
        ("train.max_train_minutes=.inf", "train.max_train_minutes"),
        ("infer.scales=[1.0, .inf]", "infer.scales[1]"),
        ("loss.terms={bce: .inf}", "loss.terms.bce"),
        ("infer.crop.weight=[0.5, .nan]", "infer.crop.weight[1]"),
        ("infer.ensemble=[{experiment: a, weight: .inf}]", "infer.ensemble[0].weight"),
    ],
)
def test_non_finite_floats_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(BASE, [override])
    msg = str(info.value)
    assert re.fullmatch(rf"command line: {re.escape(key)} must be a finite number, got \S+", msg)
    assert info.value.key == key


# ------------------------------------------------------------- one declaration per key
def test_base_yaml_is_generated_from_the_models():
    """configs/base.yaml is written by `make base-config`; edit bonecomp/config.py instead."""
    assert BASE.read_text() == base_yaml(), (
        "configs/base.yaml is stale: run `make base-config` (python scripts/write_base_config.py)"
    )


def test_the_writer_rewrites_a_stale_file(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(BASE.read_text().replace("epochs: 40", "epochs: 41"))
    assert write_base_yaml(path) and path.read_text() == base_yaml()
    assert not write_base_yaml(path)  # up to date: untouched


def test_every_key_is_declared_with_a_doc():
    def walk(cls: type[BaseModel], prefix: str = ""):
        for name, f in cls.model_fields.items():
            if _section(f.annotation):
                yield from walk(f.annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", f
            if typing.get_origin(f.annotation) is list:
                (item,) = typing.get_args(f.annotation)
                if _section(item):  # infer.ensemble's entries
                    yield from walk(item, f"{prefix}{name}[].")

    undocumented = [k for k, f in walk(Config) if not f.description]
    assert undocumented == []
    assert len(list(walk(Config))) > 90  # the walk reached every section


def test_resume_rule_is_todays_set():
    """The keys --resume may change, as RESUME_MAY_CHANGE listed them before the flags."""
    assert resume_may_change() == {
        "data.num_workers", "data.cache_dir", "data.root", "train.max_train_minutes",
        "train.device", "train.output_dir",
        "train.trackers",  # was train.tensorboard and train.wandb: how it is logged
        "train.experiment", "train.channels_last", "infer",
        "train.micro_batch", "train.memory_fraction", "train.compile",
        "extensions",  # added since: where the user's registrations live, like data.root
        "train.expect_dice",  # added since: a warning's threshold, not the training
        "train.grad_checkpointing",  # added since: recomputes, the same gradients
        "train.dist_timeout",  # added since: how long a rank waits for the others to join
    }  # fmt: skip


def test_scheduler_names_have_one_source():
    hint = typing.get_type_hints(TrainConfig)["scheduler"]
    assert typing.get_args(hint) == SCHEDULERS
    assert "plateau" in SCHEDULERS


class _TrainWithANewKey(TrainConfig):
    """What a contributor writes to add a key: one declaration (and the code that reads it)."""

    warmup_share: float = Field(0.1, ge=0, lt=1, json_schema_extra=RESUME)
    """share of the first epoch spent warming up"""
    ceiling: float = Field(2.0, allow_inf_nan=True)
    """a float that may be infinite"""


class _ConfigWithANewKey(Config):
    train: _TrainWithANewKey = Field(default_factory=_TrainWithANewKey)


def test_a_new_key_is_one_declaration():
    # base.yaml: the key with its default and its doc, in its section
    text = base_yaml(_ConfigWithANewKey)
    train = text[text.index("\ntrain:\n") : text.index("\ninfer:\n")]
    assert re.search(
        r"\n  warmup_share: 0\.1 +# share of the first epoch spent warming up\n", train
    )
    assert re.search(r"\n  ceiling: 2\.0 +# a float that may be infinite", train)
    assert yaml.safe_load(text)["train"]["warmup_share"] == 0.1
    # the loader knows its type, check_values its rule (with the source of the value)
    cfg = from_dict(_ConfigWithANewKey, {"train": {"warmup_share": 0.3}})
    assert cfg.train.warmup_share == 0.3
    check_values(cfg)
    with pytest.raises(ConfigError, match=r"train\.warmup_share must be float"):
        from_dict(_ConfigWithANewKey, {"train": {"warmup_share": "x"}})
    out_of_range = r"^config: train\.warmup_share must be in \[0, 1\), got 1\.5$"
    with pytest.raises(ConfigError, match=out_of_range):  # pydantic checks ranges as it loads
        from_dict(_ConfigWithANewKey, {"train": {"warmup_share": 1.5}})
    cfg.train.warmup_share = 1.5  # assigned after loading: check_values validates again
    with pytest.raises(ConfigError, match=out_of_range):
        check_values(cfg)
    cfg.train.warmup_share, cfg.train.ceiling = 0.3, math.inf
    check_values(cfg)  # finite=False lets this one be inf
    # --resume follows the flag
    may = resume_may_change(_ConfigWithANewKey)
    assert may == resume_may_change() | {"train.warmup_share"}


def test_a_pattern_needs_its_wording():
    """A regex is no error message: a key with a pattern says how its error reads."""
    with pytest.raises(TypeError, match=r"_Bad\.name: a pattern needs its want\(\.\.\.\) words"):

        class _Bad(Section):
            name: str = Field("a", pattern=r"^[a-z]+$")
            """a name"""


# ------------------------------------------------------------------------- schema.json
def test_schema_json_is_generated_from_the_models():
    """configs/schema.json is written by `make base-config`, like base.yaml."""
    assert SCHEMA_JSON.read_text() == schema_json(), (
        "configs/schema.json is stale: run `make base-config` (python scripts/write_base_config.py)"
    )


def test_the_schema_writer_rewrites_a_stale_file(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text("{}\n")
    assert write_schema(path) and path.read_text() == schema_json()
    assert not write_schema(path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_schema_validates_every_recipe_and_editors_find_it(path):
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema=schema.json\n")
    jsonschema.validate(yaml.safe_load(text), json.loads(SCHEMA_JSON.read_text()))


@pytest.mark.parametrize(
    "recipe, words",
    [
        ({"train": {"epochz": 3}}, "Additional properties"),  # an unknown key
        ({"bogus": 1}, "Additional properties"),
        ({"train": {"epochs": "three"}}, "is not of type 'integer'"),  # a wrong type
        ({"train": {"amp": 1}}, "is not of type 'boolean'"),
        ({"infer": {"ensemble": [{"experiment": "a", "foldz": [0]}]}}, "Additional properties"),
        ({"train": {"epochs": 0}}, "less than the minimum of 1"),  # a range, too
    ],
)
def test_the_schema_refuses_what_the_loader_refuses(recipe, words):
    schema = json.loads(SCHEMA_JSON.read_text())
    jsonschema.validate({"extends": "base.yaml", "train": {"lr": 3.0e-3}}, schema)
    with pytest.raises(jsonschema.ValidationError, match=words):
        jsonschema.validate({"extends": "base.yaml", **recipe}, schema)
    with pytest.raises(ConfigError):
        from_dict(Config, recipe)


# ------------------------------------------------------------------ bad recipe files
def _recipe_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (recipe file, what its one-line error must say)."""
    cases = {}
    dup = tmp_path / "dup.yaml"  # a second train: block would silently replace the first
    dup.write_text(
        "train:\n  experiment: a\n  epochs: 3\nmodel: {arch: unet}\ntrain:\n  epochs: 9\n"
    )
    cases["duplicate section"] = (dup, r"dup\.yaml: key 'train' is given twice \(lines 1 and 5\)")
    inner = tmp_path / "inner.yaml"
    inner.write_text("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 4\n")
    cases["duplicate key"] = (inner, r"inner\.yaml: key 'epochs' is given twice \(lines 2 and 4\)")
    listed = tmp_path / "listed.yaml"
    listed.write_text("extends: [base.yaml]\n")
    cases["extends list"] = (listed, r"listed\.yaml: extends must name one file")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train: {experiment: caf\u00e9}\n".encode("latin-1"))
    cases["latin-1 byte"] = (
        latin,
        r"latin\.yaml: not a UTF-8 text file \(byte 0xe9 at offset 23\)",
    )
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    cases["a checkpoint"] = (ckpt, r"best\.pt: not a YAML recipe but a zip archive")
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "{a: " * 6000 + "1" + "}" * 6000 + "\n")
    cases["nested 6000 deep"] = (deep, r"deep\.yaml: nested too deep")
    return cases


CASES = ("duplicate section", "duplicate key", "extends list", "latin-1 byte", "a checkpoint",
         "nested 6000 deep")  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_bad_recipe_file_is_one_line_naming_it(case, tmp_path):
    path, message = _recipe_cases(tmp_path)[case]
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_a_bad_recipe_file_ends_the_script_in_one_line(tmp_path, capsys):
    """Through a script: ``--config best.pt`` and a duplicated key, exit 2, one line."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import train as train_script

    for case in ("a checkpoint", "duplicate section"):
        path, message = _recipe_cases(tmp_path)[case]
        assert train_script.main(["--config", str(path), "--fold", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert re.search(message, err) and err.startswith("error: ") and "\n" not in err


def test_the_same_key_in_a_parent_and_its_child_is_not_a_duplicate(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {epochs: 3}\n")
    (tmp_path / "r.yaml").write_text("extends: base.yaml\ntrain: {epochs: 5}\n")
    assert load_config(tmp_path / "r.yaml").train.epochs == 5
