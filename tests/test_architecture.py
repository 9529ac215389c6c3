"""Dependencies point one way (ARCHITECTURE): low-level modules never import higher ones,
and nothing in the library imports ``viz`` or ``report`` (leaves for scripts; the report
embeds viz's pictures) or ``testing`` (the kit of references for tests and benchmarks)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "bonecomp"

# Lower numbers may be imported by higher ones, never the reverse.
LAYERS = {
    "bonecomp.classes": 0,
    "bonecomp.config": 0,
    "bonecomp.device": 0,  # device, autocast dtype, memory format
    "bonecomp.rle": 0,
    "bonecomp.fileio": 0,
    "bonecomp.distributed": 0,
    "bonecomp.memory": 0,  # out-of-memory handling and meters (torch only)
    "bonecomp.workers": 0,  # worker processes end with their parent (stdlib only)
    "bonecomp.registry": 0,  # the one registry type of every extension point (config only)
    "bonecomp.extensions": 1,  # imports the user's modules named by the config
    "bonecomp.runs": 1,  # the run folder's names (config + file helpers only)
    "bonecomp.data": 1,
    "bonecomp.data.truth": 1,  # truth polygons by image: the cache's, else the JSON
    "bonecomp.models": 1,
    "bonecomp.losses": 1,
    "bonecomp.optim": 1,
    "bonecomp.metrics": 1,
    "bonecomp.checkpoint": 1,
    "bonecomp.submission": 2,
    "bonecomp.engine": 2,
    "bonecomp.inference": 2,
    "bonecomp.inference.oof": 2,  # the one reader of a run's oof.npy / oof_index.csv
    "bonecomp.trackers": 2,  # TensorBoard / W&B / MLflow behind one interface
    "bonecomp.checks": 2,  # the whole config against the registries
    "bonecomp.inference.predict": 3,  # wiring: test images -> validated CSV
    "bonecomp.inference.pseudo_labels": 3,  # wiring: test images -> pseudo-label folder
    "bonecomp.training": 3,  # wiring: one fold end to end
    "bonecomp.doctor": 3,  # wiring: checks a machine against a recipe
    "bonecomp.viz": 4,
    "bonecomp.report": 4,  # HTML pages of runs: embeds viz's pictures (a leaf)
    "bonecomp.testing": 4,  # references for tests/ and benchmarks/: may import any module
    "bonecomp.cli": 5,  # what the scripts share
}


# Leaves for scripts and tests: only the modules named may import them.
LEAVES = {
    "bonecomp.viz": {"bonecomp.viz", "bonecomp.report"},
    "bonecomp.report": {"bonecomp.report"},
    "bonecomp.testing": {"bonecomp.testing"},
}


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise KeyError(f"{module} has no layer: add it to LAYERS")


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m.startswith("bonecomp.")}


MODULES = sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    name = "bonecomp." + ".".join(path.relative_to(PKG).with_suffix("").parts)
    name = name.removesuffix(".__init__")
    for dep in imports(path):
        for leaf, allowed in LEAVES.items():
            assert not dep.startswith(leaf) or name in allowed, f"{name} imports {leaf}"
        assert layer(dep) <= layer(name), f"{name} (layer {layer(name)}) imports {dep}"
