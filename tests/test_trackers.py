"""``train.trackers``: one tiny real training run logs to TensorBoard, W&B (offline) and
MLflow (local SQLite store); each is read back with the library's own reader and compared
with the run's ``summary.csv`` and ``dice_per_class.csv`` (read by pandas)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pandas as pd
import pytest

from bonecomp.classes import CLASSES
from bonecomp.config import ConfigError, config_from_saved, load_config, to_dict
from bonecomp.testing import DEMO_CONFIG, tiny_config, tiny_overrides
from bonecomp.training import fold as training
from bonecomp.training import run_training

ROOT = Path(__file__).resolve().parents[1]
ALL = ["tensorboard", "wandb", "mlflow"]


def _train_script():
    sys.path.insert(0, str(ROOT / "scripts"))
    import train as train_script

    return train_script


@pytest.fixture(scope="module")
def tracked(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-epoch run of scripts/train.py with all three trackers (module-wide: one run).

    W&B offline with its files in a temporary WANDB_DIR; MLflow without a tracking URI,
    so the default store (``<train.output_dir>/mlflow.db``) is the one under test.
    """
    for name in ALL:
        pytest.importorskip(name)
    pytest.importorskip("sqlalchemy")
    import wandb

    wandb.teardown()  # W&B's settings are process-wide: read them from this environment
    work = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(work / "wandb_dir"))
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mp.delenv("WANDB_PROJECT", raising=False)
        (work / "wandb_dir").mkdir()
        args = ["--config", str(DEMO_CONFIG), "--fold", "0", "--quiet"]
        over = tiny_overrides(tiny_root, work, **{"train.trackers": ALL})
        assert _train_script().main(args + over) == 0
    wandb.teardown()  # and the next test reads its own
    run = work / "runs" / "tiny" / "fold0"
    dice = pd.read_csv(run / "dice_per_class.csv")
    return {
        "work": work,
        "run": run,
        "summary": pd.read_csv(run / "summary.csv"),
        "dice": dict(zip(dice["class"], dice["dice"], strict=True)),
        "report": work / "runs" / "tiny" / "report.html",
    }


def _columns(summary: pd.DataFrame) -> list[str]:
    """The numeric per-epoch columns that every tracker must hold."""
    cols = [
        c for c in summary.columns if c != "epoch" and pd.api.types.is_numeric_dtype(summary[c])
    ]
    assert {"loss", "val_dice", "lr", "elapsed"} <= set(cols)  # the run logged something
    return cols


def _check_final(final: dict[str, float], expected: dict[str, float]) -> None:
    assert len(final) == 29 and set(final) == set(CLASSES)
    assert {"finger-1", "Radius", "Lunate"} <= set(final)
    assert final == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- TensorBoard
def test_tensorboard_events_hold_config_every_column_and_the_final_dice(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked["run"] / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    summary = tracked["summary"]
    for col in _columns(summary):
        events = acc.Scalars(col)
        assert [e.step for e in events] == summary["epoch"].tolist(), col
        assert [e.value for e in events] == pytest.approx(summary[col].tolist(), rel=1e-6), col
    final = {t.removeprefix("final_dice/"): acc.Scalars(t)[-1].value
             for t in acc.Tags()["scalars"] if t.startswith("final_dice/")}  # fmt: skip
    _check_final(final, tracked["dice"])
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "image_size: 64" in config and "experiment: tiny" in config
    # TensorBoard keeps no files: the report's path is noted as text
    where = acc.Tensors("report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert Path(where) == tracked["report"].resolve() and tracked["report"].is_file()


# --------------------------------------------------------------------------- W&B
BLOCK = 32 * 1024  # the .wandb file's block size


def _wandb_records(path: Path):
    """The records of an offline run's ``run-<id>.wandb`` as ``wandb_internal_pb2.Record``.

    wandb 0.31 has no Python reader of this file any more (``wandb.sdk.internal.datastore``
    is gone; its Go core reads it): the framing (a 7-byte ``:W&B`` header, then LevelDB-log
    chunks: crc32 u32, length u16, type u8, in 32 KiB blocks) is split here, and every
    record is decoded by wandb's own protobuf schema.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_holds_config_every_column_the_final_dice_and_the_report(tracked):
    pytest.importorskip("wandb")
    files = list((tracked["work"] / "wandb_dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files  # WANDB_DIR respected, one run
    history: dict[int, dict] = {}
    summary_updates: dict[str, float] = {}
    config: dict[str, object] = {}
    artifacts = []
    for r in _wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {_key(i): json.loads(i.value_json) for i in r.history.item}
            history[int(items["_step"])] = items
        elif kind == "summary":
            summary_updates.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "run":
            config.update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
            assert r.run.display_name == "tiny/fold0" and r.run.project == "bonecomp"
        elif kind == "artifact":
            artifacts.append(r.artifact)
    summary = tracked["summary"]
    assert sorted(history) == summary["epoch"].tolist()
    for col in _columns(summary):
        got = [history[e][col] for e in summary["epoch"]]
        assert got == pytest.approx(summary[col].tolist(), rel=1e-9), col
    final = {k.removeprefix("final_dice/"): v for k, v in summary_updates.items()
             if k.startswith("final_dice/")}  # fmt: skip
    _check_final(final, tracked["dice"])
    assert config["data"]["image_size"] == 64
    assert config["train"]["trackers"] == ALL
    (report,) = [a for a in artifacts if a.type == "report"]
    assert [e.path for e in report.manifest.contents] == ["report.html"]
    assert tracked["report"].is_file()


# --------------------------------------------------------------------------- MLflow
def test_mlflow_local_store_holds_params_every_column_the_final_dice_and_the_report(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked['work'] / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bonecomp")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny/fold0" and run.info.status == "FINISHED"
    assert run.data.params["data.image_size"] == "64"
    assert run.data.params["train.experiment"] == "tiny"
    summary = tracked["summary"]
    for col in _columns(summary):
        history = sorted(client.get_metric_history(run.info.run_id, col), key=lambda m: m.step)
        assert [m.step for m in history] == summary["epoch"].tolist(), col
        assert [m.value for m in history] == pytest.approx(summary[col].tolist(), rel=1e-9), col
    final = {k.removeprefix("final_dice/"): v for k, v in run.data.metrics.items()
             if k.startswith("final_dice/")}  # fmt: skip
    _check_final(final, tracked["dice"])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "config.yaml"} <= names
    local = Path(client.download_artifacts(run.info.run_id, "report.html", str(tracked["work"])))
    assert local.read_bytes() == tracked["report"].read_bytes()


def test_a_fold_that_fails_closes_its_tracker_run_as_failed(tiny_root, tmp_path, monkeypatch):
    MlflowClient = pytest.importorskip("mlflow.tracking").MlflowClient
    pytest.importorskip("sqlalchemy")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def broken(*args, **kwargs):
        raise RuntimeError("the first epoch broke")

    monkeypatch.setattr(training, "train_one_epoch", broken)
    cfg = tiny_config(tiny_root, tmp_path, **{"train.trackers": ["mlflow"]})
    with pytest.raises(RuntimeError, match="the first epoch broke"):
        run_training(cfg, 0, progress=False)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bonecomp").experiment_id])
    assert run.info.status == "FAILED"


# --------------------------------------------------------------------------- config check
@pytest.mark.parametrize(
    ("name", "module"),
    [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow"),
     ("mlflow", "sqlalchemy")],  # the default SQLite store's
)  # fmt: skip
def test_a_tracker_whose_package_is_missing_is_one_line_before_any_work(
    name, module, tiny_root, tmp_path, capsys, monkeypatch
):
    """The import fails (as without the package): one line naming the key, the package
    and the install command, before the cache or the run folder is written."""
    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now raises
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trackers = [name] if name == "tensorboard" else ["tensorboard", name]
    key = f"train.trackers[{len(trackers) - 1}]"
    if name != "tensorboard":
        pytest.importorskip("tensorboard")  # the first entry must pass
    args = ["--config", str(DEMO_CONFIG), "--fold", "0", "--quiet"]
    over = tiny_overrides(tiny_root, tmp_path, **{"train.trackers": trackers})
    assert _train_script().main(args + over) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: command line: {key}: {name} needs {module}"), err
    assert 'pip install -e ".[track]"' in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_scripts_that_do_not_train_ignore_the_trackers_packages(tiny_root, tmp_path, monkeypatch):
    """A recipe that logs to W&B still predicts on a machine without wandb: only training
    checks the trackers' packages."""
    from bonecomp.checks import check_config

    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = tiny_config(tiny_root, tmp_path, **{"train.trackers": ["wandb"]})
    check_config(cfg, training=False)
    with pytest.raises(ConfigError, match=r"train\.trackers\[0\]: wandb needs wandb"):
        check_config(cfg)


def test_wandb_without_a_login_is_one_line_saying_what_to_do(
    tiny_root, tmp_path, capsys, monkeypatch
):
    """W&B online without an API key (a fresh machine): its own reason and the ways out
    (login, WANDB_MODE=offline) in one line, not a traceback."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # settings are read again, from this test's environment
    for var in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no saved settings
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ["--config", str(DEMO_CONFIG), "--fold", "0", "--quiet"]
    over = tiny_overrides(tiny_root, tmp_path, **{"train.trackers": ["wandb"]})
    assert _train_script().main(args + over) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: train.trackers[0]: wandb did not start (") and "API key" in err
    assert "wandb login" in err and "WANDB_MODE=offline" in err
    assert not (tmp_path / "runs" / "tiny" / "fold0" / "last.pt").exists()


def test_mlflow_with_a_server_needs_no_sqlite_support(monkeypatch):
    """Without MLFLOW_TRACKING_URI MLflow's default store is a local SQLite file, which
    needs sqlalchemy; with a server it does not (needs mlflow itself: the track extra)."""
    from bonecomp import trackers
    from bonecomp.trackers import check_trackers

    pytest.importorskip("mlflow", reason="the track extra (mlflow-skinny) is not installed")

    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="mlflow needs sqlalchemy"):
        check_trackers(["mlflow"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setattr(trackers, "reachable", lambda *a: True)  # as if the server answered
    check_trackers(["mlflow"])  # the server keeps the store


def test_an_unknown_or_repeated_tracker_is_one_line_naming_the_valid_ones(tmp_path):
    from bonecomp.checks import check_config

    cfg = load_config(DEMO_CONFIG, ["train.trackers=[neptune]"])
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert str(e.value) == (
        "command line: train.trackers[0]: unknown tracker 'neptune'; valid: tensorboard, wandb,"
        " mlflow"
    )
    cfg = load_config(DEMO_CONFIG, ["train.trackers=[mlflow, mlflow]"])
    with pytest.raises(ConfigError, match=r"train.trackers\[1\]: lists 'mlflow' twice"):
        check_config(cfg)


def test_the_old_booleans_point_to_train_trackers_and_old_runs_still_load():
    with pytest.raises(ConfigError, match=r"train.tensorboard was replaced by train.trackers"):
        load_config(DEMO_CONFIG, ["train.tensorboard=true"])
    with pytest.raises(ConfigError, match=r"train.wandb was replaced by train.trackers"):
        load_config(DEMO_CONFIG, ["train.wandb=false"])
    saved = to_dict(load_config(DEMO_CONFIG))
    del saved["train"]["trackers"]
    saved["train"].update(tensorboard=True, wandb=False)  # a run saved before trackers
    assert config_from_saved(saved, "old/config.yaml").train.trackers == ["tensorboard"]
