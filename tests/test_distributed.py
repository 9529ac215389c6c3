"""torchrun on the tiny phantom: one node of two processes, and two nodes of one process
each without a shared file system (loopback, gloo), each node with its own output and
cache folders.

What is checked comes from outside the code under test: every rank prints (``--debug``)
the items it trained on and a hash of its final weights; the test hashes the weights of
rank 0's ``last.pt`` itself and compares.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonecomp.checkpoint import load_checkpoint
from bonecomp.config import config_from_saved
from bonecomp.data.phantom import make_phantom
from bonecomp.models import create_model
from bonecomp.testing import TINY, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUN_FILES = ("config.yaml", "summary.csv", "best.pt", "last.pt", "oof.npy", "oof_index.csv")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(logs: Path, *args: str) -> list[str]:
    """A torchrun command line; each worker's stdout and stderr go to files under
    ``logs`` (``worker_output``), apart from the launcher's own report."""
    return [sys.executable, "-m", "torch.distributed.run", f"--log-dir={logs}", "--redirects=3",
            *args]  # fmt: skip


def worker_output(logs: Path, stream: str) -> str:
    """What the workers launched with ``logs`` wrote to ``stream`` (stdout / stderr)."""
    return "".join(p.read_text() for p in sorted(logs.rglob(f"{stream}.log")))


def params_hash(checkpoint: Path) -> str:
    """sha256 over the parameters (name, float32 bytes) of a checkpoint's model, in the
    model's parameter order; buffers (BatchNorm statistics) are per rank under DDP."""
    ckpt = load_checkpoint(checkpoint)
    model = create_model(config_from_saved(ckpt["config"], str(checkpoint)).model)
    model.load_state_dict(ckpt["model"])
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().numpy().tobytes())
    return h.hexdigest()


def rank_lines(output: str, what: str) -> dict[int, str]:
    """``{rank: text}`` of the ``--debug`` lines ``rank R (...): <what> <text>``."""
    found = re.findall(rf"debug: rank (\d+) \([^)]*\): {what} (.+)", output)
    return {int(r): text.strip() for r, text in found}


def items_by_rank(output: str) -> dict[int, set[int]]:
    lines = rank_lines(output, r"epoch 0 trains on items")
    return {r: set(map(int, re.findall(r"\d+", text))) for r, text in lines.items()}


def check_run_folder(run: Path) -> None:
    """The complete run folder: every file, no leftover (``.lock``, ``.staged``), every
    OOF row written (a probability is never exactly 0; an unwritten row is all 0)."""
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    oof = np.load(run / "oof.npy")
    assert oof.shape[0] == len(pd.read_csv(run / "oof_index.csv")) >= 2
    assert (oof.reshape(len(oof), -1).max(axis=1) > 0).all(), "OOF rows missing"


def test_two_processes_keep_their_weights_in_sync(tiny_root, tmp_path):
    """Two ranks train on different images (the sampler's shares, logged by each rank),
    yet end with the same weights, those of rank 0's last.pt: DDP averaged the
    gradients. Without the DDP wrapper each rank would drift apart on its own data."""
    logs = tmp_path / "logs"
    cmd = torchrun(logs, "--nproc_per_node=2", f"--master_port={free_port()}", *TRAIN)
    cmd += ["--fold", "0", "--quiet", "--debug"]
    cmd += tiny_overrides(tiny_root, tmp_path, **{"train.epochs": 1})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, worker_output(logs, "stderr")[-3000:]
    stdout = worker_output(logs, "stdout")
    run = tmp_path / "runs" / "tiny" / "fold0"
    check_run_folder(run)
    assert pd.read_csv(run / "summary.csv")["epoch"].tolist() == [0]
    items = items_by_rank(stdout)
    assert set(items) == {0, 1} and items[0] and items[1]
    assert not items[0] & items[1], "the ranks must train on different images"
    digests = rank_lines(stdout, "weights sha256")
    assert digests == {0: params_hash(run / "last.pt"), 1: params_hash(run / "last.pt")}


def test_a_refused_run_folder_ends_every_rank_in_its_one_line(tiny_root, tmp_path):
    """Rank 0 refuses a run folder that already holds a run: both ranks print rank 0's
    own message (not a pointer to it), with no traceback, and no lock is left."""
    run = tmp_path / "runs" / "tiny" / "fold0"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"an earlier run")
    logs = tmp_path / "logs"
    cmd = torchrun(logs, "--nproc_per_node=2", f"--master_port={free_port()}", *TRAIN)
    cmd += ["--fold", "0", "--quiet", *tiny_overrides(tiny_root, tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert proc.returncode != 0
    per_rank = [p.read_text().strip().splitlines() for p in sorted(logs.rglob("stderr.log"))]
    assert len(per_rank) == 2
    for lines in per_rank:
        assert len(lines) == 1, lines
        assert re.fullmatch(
            r"error: rank 0 \(node 0, .*\): .*fold0 already holds a run; .*", lines[0]
        )
    assert sorted(p.name for p in run.iterdir()) == ["last.pt"]


def two_nodes(
    roots: list[Path], tmp_path: Path, *args: str, logs: str = "logs"
) -> list[tuple[int, str, str]]:
    """Fold 0 for one epoch on two torchrun nodes of one process each (node ``i`` reads
    ``roots[i]`` and writes under ``tmp_path/node<i>``: nothing shared but the network);
    each node's (exit code, worker stdout, worker stderr)."""
    port = free_port()
    procs = []
    for node, root in enumerate(roots):
        work = tmp_path / f"node{node}"
        work.mkdir(exist_ok=True)
        cmd = torchrun(
            work / logs, "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
            "--master_addr=127.0.0.1", f"--master_port={port}", *TRAIN,
        )  # fmt: skip
        cmd += ["--fold", "0", "--quiet", "--debug", *args]
        cmd += tiny_overrides(root, work, **{"train.epochs": 1})
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=ENV, cwd=work))  # fmt: skip
    done = []
    try:
        for node, p in enumerate(procs):
            folder = tmp_path / f"node{node}" / logs
            rc = p.wait(timeout=300)
            done.append((rc, worker_output(folder, "stdout"), worker_output(folder, "stderr")))
    finally:  # a node left waiting for the other (a hang is a failure) is ended
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    return done


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_two_nodes_without_a_shared_file_system(tiny_root, tmp_path):
    """Each node builds its own cache; rank 0 alone writes the run folder, complete with
    the OOF rows of rank 1's validation images; both ranks end with rank 0's weights,
    also after ``--resume`` (of the finished run: nothing is left to train, but rank 1 must
    get ``last.pt``'s weights from rank 0, having no run folder of its own)."""
    (rc0, out0, err0), (rc1, out1, err1) = two_nodes([tiny_root, tiny_root], tmp_path)
    assert rc0 == 0 and rc1 == 0, err0[-2000:] + err1[-2000:]
    run = tmp_path / "node0" / "runs" / "tiny" / "fold0"
    check_run_folder(run)
    assert files_under(tmp_path / "node1" / "runs") == []  # rank 1 wrote no run file
    for node in ("node0", "node1"):  # each node its own cache
        assert list((tmp_path / node / "cache").glob("*/train_64/manifest.json")), node
    digests = {**rank_lines(out0, "weights sha256"), **rank_lines(out1, "weights sha256")}
    assert digests == {0: params_hash(run / "last.pt"), 1: params_hash(run / "last.pt")}
    items = {**items_by_rank(out0), **items_by_rank(out1)}
    assert set(items) == {0, 1} and not items[0] & items[1]

    nodes = two_nodes([tiny_root, tiny_root], tmp_path, "--resume", logs="again")
    (rc0, out0, err0), (rc1, out1, err1) = nodes
    assert rc0 == 0 and rc1 == 0, err0[-2000:] + err1[-2000:]
    check_run_folder(run)
    assert files_under(tmp_path / "node1" / "runs") == []
    digests = {**rank_lines(out0, "weights sha256"), **rank_lines(out1, "weights sha256")}
    assert digests == {0: params_hash(run / "last.pt"), 1: params_hash(run / "last.pt")}


def test_a_node_with_other_data_stops_both_in_one_line(tiny_root, tmp_path):
    """Node 1's data root holds another phantom (same layout and names, other pixels):
    both ranks stop before training with the same one line naming rank 1 and the two
    hashes, no traceback from either rank, no run file left on node 0."""
    other = tmp_path / "other"
    make_phantom(other, workers=1, progress=False, **{**TINY, "seed": TINY["seed"] + 1})
    for rc, _, err in two_nodes([tiny_root, other], tmp_path):
        assert rc != 0
        lines = err.strip().splitlines()  # the worker's whole stderr
        assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
        assert re.search(
            r"rank 1 \(node 1, .*other training data.*hashes to [0-9a-f]{12}", lines[0]
        )
    assert files_under(tmp_path / "node0" / "runs") == []  # no .lock, no .staged
    assert files_under(tmp_path / "node1" / "runs") == []


SIGTERM_INSIDE_A_LOCK = """
import os, signal, sys
from pathlib import Path
from bonecomp import distributed
from bonecomp.runs import RunDir
distributed._exit_cleanly_on_sigterm()
with RunDir(Path(sys.argv[1])).lock():
    os.kill(os.getpid(), signal.SIGTERM)
    signal.pause()  # the handler ends it here
"""


def test_a_rank_that_torchrun_ends_removes_its_lock(tmp_path):
    """torchrun stops the other processes with SIGTERM when one fails: a rank holding the
    run folder's lock exits through its context managers (143, no lock left)."""
    run = tmp_path / "fold0"
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_INSIDE_A_LOCK, str(run)],
        capture_output=True, text=True, timeout=60, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr == "" and not run.exists()  # no lock, and the empty folder it made goes


GATHER_OOF = """
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from bonecomp import distributed
from bonecomp.runs import RunDir
from bonecomp.training.records import commit_oof, gather_oof, stage_oof

dd = distributed.setup("cpu")
val_idx = np.array([7, 3, 9, 1, 5])  # 3 rows on rank 0, 2 on rank 1
cache = SimpleNamespace(index=pd.DataFrame({"rel": [f"img{i}" for i in range(10)]}))
cfg = SimpleNamespace(train=SimpleNamespace(oof_size=4))
run = RunDir(Path(sys.argv[1]) / f"rank{dd.rank}")  # only rank 0's may get files
oof = stage_oof(cfg, run, cache, val_idx, dd)
for i in val_idx[dd.rank :: dd.world]:  # this rank's validation share, as the loader's
    oof.write(int(i), torch.full((29, 8, 8), float(i) / 16))
gather_oof(oof, dd)
if dd.main:
    commit_oof(run)
distributed.shutdown()
"""


def test_oof_rows_of_every_rank_land_in_their_row(tmp_path):
    """Each rank writes its share of five validation images (value: the image's cache
    row / 16); rank 0's oof.npy holds every image's value in the image's own row, and
    rank 1 created no run folder."""
    script = tmp_path / "gather.py"
    script.write_text(GATHER_OOF)
    logs = tmp_path / "logs"
    cmd = torchrun(logs, "--nproc_per_node=2", f"--master_port={free_port()}", str(script))
    proc = subprocess.run([*cmd, str(tmp_path)], capture_output=True, timeout=120, env=ENV)
    assert proc.returncode == 0, worker_output(logs, "stderr")[-3000:]
    oof = np.load(tmp_path / "rank0" / "oof.npy")
    index = pd.read_csv(tmp_path / "rank0" / "oof_index.csv")
    assert index["rel"].tolist() == ["img7", "img3", "img9", "img1", "img5"]
    expected = np.array([7, 3, 9, 1, 5], np.float16)[:, None, None, None] / 16
    np.testing.assert_array_equal(oof, np.broadcast_to(expected, (5, 29, 4, 4)))
    assert not (tmp_path / "rank1").exists()


# ------------------------------------------------- torchrun variables (issue 29, case 8)
def _train_in_process(tmp_path: Path, capsys, **extra) -> tuple[int, str]:
    sys.path.insert(0, str(ROOT / "scripts"))
    import train as train_script

    args = [*TRAIN[1:], "--fold", "0", "--quiet", *tiny_overrides(ROOT / "nodata", tmp_path)]
    args += [f"{k}={v}" for k, v in extra.items()]
    code = train_script.main(args)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "env, says",
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 without RANK, MASTER_ADDR, MASTER_PORT"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"},
         "MASTER_PORT='http' is not a port"),
        ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
         "RANK=2 is not a rank of WORLD_SIZE=2"),
    ],
    ids=["world alone", "world not a number", "port not a number", "rank out of range"],
)  # fmt: skip
def test_torchrun_variables_are_checked_before_any_work(env, says, tmp_path, capsys, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # (a short rendezvous timeout: torch, given RANK=2 of 2, waited 30 minutes for a store)
    code, err = _train_in_process(tmp_path, capsys, **{"train.dist_timeout": 3})
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert says in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_a_rank_alone_waits_for_train_dist_timeout_and_says_for_whom(tiny_root, tmp_path):
    """Rank 0 of 2 with no rank 1: a line says what it waits for, and after
    ``train.dist_timeout`` seconds one error line (not torch's 30 minutes of silence)."""
    port = free_port()
    env = {**ENV, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    args = [*tiny_overrides(tiny_root, tmp_path), "train.dist_timeout=3"]
    cmd = [sys.executable, *TRAIN, "--fold", "0", "--quiet", *args]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert f"waiting for 2 ranks at 127.0.0.1:{port}" in done.stdout, done.stdout
    err = done.stderr.strip()
    assert done.returncode == 2 and "\n" not in err, err
    assert "train.dist_timeout=3" in err and f"127.0.0.1:{port}" in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
