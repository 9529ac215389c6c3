"""The synthetic phantom honours docs/format.md, looks like a hand and is deterministic."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import itertools
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from bonecomp.classes import (
    CARPALS,
    CLASS_TO_INDEX,
    CLASSES,
    FINGERS,
    FOREARM,
    NUM_CLASSES,
    THUMB,
)
from bonecomp.data.annotations import load_annotation
from bonecomp.data.phantom import (
    MIN_SIZE,
    make_phantom,
    plan_patients,
    planned_stats,
    sample_patient,
)
from bonecomp.data.phantom.anatomy import DIGIT_CLASSES, OVERLAP_MM, OVERLAPS
from bonecomp.data.phantom.artefacts import Artefacts
from bonecomp.data.phantom.hand import draw_hand
from bonecomp.data.phantom.skeleton import build_skeleton
from bonecomp.data.verify import verify_dataset

SIZE = 256
TRAIN, TEST = 3, 2
SEED = 5
KEYS = [
    "annotations",
    "attributes",
    "file_id",
    "filename",
    "parent_path",
    "last_modifier_id",
    "metadata",
    "last_workers",
]
ALWAYS = {frozenset((CARPALS[0], CARPALS[1])), frozenset((CARPALS[6], CARPALS[7]))}
STEM = re.compile(r"image\d{13}(_[RL])?")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    summary = make_phantom(out, TRAIN, TEST, size=SIZE, seed=SEED, workers=1, progress=False)
    assert (summary.n_train_images, summary.n_test_images) == (2 * TRAIN, 2 * TEST)
    assert (summary.root, summary.size, summary.seed) == (out, SIZE, SEED)
    return out


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def pairs(root: Path) -> list[tuple[Path, Path]]:
    """(png, json) for every image, training and test, paired by relative path."""
    out = []
    for images, labels in (("train/DCM", "train/outputs_json"), ("test/DCM", "test_labels")):
        for png in sorted((root / images).rglob("*.png")):
            rel = png.relative_to(root / images).with_suffix(".json")
            out.append((png, root / labels / rel))
    return out


def masks(json_path: Path, size: int = SIZE) -> np.ndarray:
    polygons = load_annotation(json_path)
    out = np.zeros((NUM_CLASSES, size, size), np.uint8)
    for c in range(NUM_CLASSES):
        cv2.fillPoly(out[c], [polygons[c]], 1)
    return out.astype(bool)


def centroid(poly: np.ndarray) -> np.ndarray:
    m = cv2.moments(poly)
    return np.array([m["m10"], m["m01"]]) / m["m00"]


def test_layout(root: Path) -> None:
    assert sorted(p.name for p in root.iterdir()) == ["test", "test_labels", "train"]
    ids = {}
    for split, labels in (("train", root / "train/outputs_json"), ("test", root / "test_labels")):
        folders = sorted((root / split / "DCM").iterdir())
        ids[split] = [f.name for f in folders]
        assert [f.name for f in sorted(labels.iterdir())] == ids[split]
        for folder in folders:
            pngs = sorted(p.stem for p in folder.iterdir())
            assert len(pngs) == 2 and all(STEM.fullmatch(s) for s in pngs)
            assert sorted(p.stem for p in (labels / folder.name).iterdir()) == pngs
    assert ids["train"] + ids["test"] == [f"ID{i:03d}" for i in range(1, TRAIN + TEST + 1)]
    stems = [p.stem for p in root.rglob("*.png")]
    assert len(set(stems)) == len(stems) == 2 * (TRAIN + TEST)
    train = [p.stem for p in (root / "train").rglob("*.png")]
    assert 0 < sum(s.endswith(("_R", "_L")) for s in train) < len(train)
    assert not any(p.stem.endswith(("_R", "_L")) for p in (root / "test").rglob("*.png"))
    assert not list(root.rglob("*.tmp"))


def test_pngs_are_8bit_grey(root: Path) -> None:
    for png, _ in pairs(root):
        image = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE)


def test_json_schema(root: Path) -> None:
    orders = []
    for png, path in pairs(root):
        doc = json.loads(path.read_text())
        assert list(doc) == KEYS
        assert doc["attributes"] == {} and isinstance(doc["last_workers"], dict)
        assert doc["filename"] == f"{png.stem}.jpg"
        assert doc["parent_path"] == f"/{png.parent.name}"
        assert doc["metadata"]["height"] == doc["metadata"]["width"] == 3060
        assert isinstance(doc["file_id"], str) and isinstance(doc["last_modifier_id"], str)
        anns = doc["annotations"]
        assert sorted(a["label"] for a in anns) == sorted(CLASSES)
        for a in anns:
            assert set(a) == {"id", "type", "attributes", "points", "label"}
            assert a["type"] == "poly_seg" and a["attributes"] == {} and isinstance(a["id"], str)
            assert all(type(v) is int and 0 <= v < SIZE for p in a["points"] for v in p)
        orders.append([CLASS_TO_INDEX[a["label"]] for a in anns])
    assert any(order != sorted(order) for order in orders)


def test_polygons_are_valid(root: Path) -> None:
    for _, path in pairs(root):
        polygons = load_annotation(path)
        for c in range(NUM_CLASSES):
            poly = polygons[c]
            assert len(np.unique(poly, axis=0)) >= 3
            assert poly.min() >= 0 and poly.max() < SIZE


def test_only_the_known_pairs_overlap(root: Path) -> None:
    """Trapezium/Trapezoid and Triquetrum/Pisiform overlap in every image; the pairs of the
    overlap table may; all others keep a joint gap."""
    assert ALWAYS == OVERLAPS
    for _, path in pairs(root):
        m = masks(path)
        for a, b in itertools.combinations(range(NUM_CLASSES), 2):
            shared = int((m[a] & m[b]).sum())
            if frozenset((a, b)) in ALWAYS:
                assert shared > 0, (path, CLASSES[a], CLASSES[b])
            elif frozenset((a, b)) not in OVERLAP_MM:  # boundary pixels of a tiny joint gap
                assert shared <= 5, (path, CLASSES[a], CLASSES[b], shared)


def test_bones_are_drawn_where_labelled(root: Path) -> None:
    for png, path in pairs(root):
        image = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE).astype(float)
        m = masks(path)
        anything = m.any(0).astype(np.uint8)
        far = cv2.dilate(anything, np.ones((41, 41), np.uint8)) == 0
        background = image[far].mean()
        for c in range(NUM_CLASSES):
            inside = image[m[c]].mean()
            rim = (cv2.dilate(m[c].astype(np.uint8), np.ones((5, 5), np.uint8)) > 0) & ~m.any(0)
            assert inside > background + 40, (path, CLASSES[c])
            assert inside > image[rim].mean() + 15, (path, CLASSES[c])


def test_left_is_mirror_of_right(root: Path) -> None:
    """The thumb lies on opposite sides of the little finger in a patient's two images;
    a right hand has it on the left of the image."""
    for folder in sorted((root / "train/outputs_json").iterdir()):
        sides = {}
        for path in sorted(folder.iterdir()):
            polygons = load_annotation(path)
            thumb, little = (polygons[d[-1]].mean(0)[0] for d in (THUMB, FINGERS[-1]))
            sides[path.stem] = np.sign(thumb - little)
        assert sorted(sides.values()) == [-1, 1]
        for stem, side in sides.items():
            if stem.endswith(("_R", "_L")):
                assert side == (-1 if stem.endswith("_R") else 1)


def test_deterministic(root: Path, tmp_path: Path) -> None:
    make_phantom(tmp_path / "same", TRAIN, TEST, size=SIZE, seed=SEED, workers=2, progress=False)
    assert files(tmp_path / "same") == files(root)
    make_phantom(tmp_path / "other", TRAIN, TEST, size=SIZE, seed=SEED + 1, progress=False)
    ours, theirs = files(root), files(tmp_path / "other")
    assert not set(ours) & set(theirs)
    first = next(v for k, v in sorted(ours.items()) if k.endswith(".png"))
    assert first not in theirs.values()


def test_sizes_scale_proportionally(root: Path, tmp_path: Path) -> None:
    half = SIZE // 2
    make_phantom(tmp_path, TRAIN, TEST, size=half, seed=SEED, workers=1, progress=False)
    for _, path in pairs(root):
        big = load_annotation(path)
        small = load_annotation(tmp_path / path.relative_to(root))
        for c in range(NUM_CLASSES):
            assert np.abs(centroid(big[c]) / 2 - centroid(small[c])).max() < 1.0


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "test_labels").mkdir()
    (tmp_path / "test_labels" / "stale.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="overwrite"):
        make_phantom(tmp_path, 1, 1, size=MIN_SIZE, progress=False)
    make_phantom(tmp_path, 1, 1, size=MIN_SIZE, progress=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "test_labels" / "stale.json").exists()
    assert len(list(tmp_path.rglob("*.png"))) == 4


@pytest.mark.parametrize("kwargs", [{"size": MIN_SIZE - 1}, {"train_patients": -1}, {"seed": -1}])
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_phantom(tmp_path, **{"progress": False, **kwargs})
    assert not list(tmp_path.iterdir())


def test_plan_ids_and_stems() -> None:
    jobs = plan_patients(0, 995, 10)
    assert [j.patient_id for j in jobs[:2]] == ["ID0001", "ID0002"]
    assert jobs[-1].patient_id == "ID1005" and jobs[-1].split == "test"
    stems = [s for j in jobs for s in j.stems]
    assert len(set(stems)) == len(stems) and all(STEM.fullmatch(s) for s in stems)
    assert plan_patients(0, 995, 10) == jobs


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = Path(__file__).parents[1] / "scripts" / "make_phantom.py"
    spec = importlib.util.spec_from_file_location("make_phantom_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--out", str(tmp_path), "--train-patients", "1", "--test-patients", "1"]
    cli.main([*argv, "--size", str(MIN_SIZE), "--workers", "1"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("phantom: 1 train patients (2 images), 1 test patients (2 images)")
    assert len(list(tmp_path.rglob("*.json"))) == 4


# ------------------------------------------------------------------ the real data's hard parts
def test_bent_wrists_are_rarer_in_training_than_in_test() -> None:
    """About 11 % of training hands but 55 % of test hands are bent (drawn, not rendered)."""
    stats = planned_stats(0, 400, 400)
    assert stats.images == {"test": 800, "train": 800}
    train, test = stats.bent_share("train"), stats.bent_share("test")
    assert 0.06 < train < 0.16 and 0.45 < test < 0.65 and test > 3 * train


def test_bent_wrists_turn_the_hand_not_the_forearm() -> None:
    """The hand turns against the forearm about the wrist: radius and ulna stay put."""
    job = next(j for j in plan_patients(0, 50, 0) if sample_patient(j, 0).hands[0].pose.bent)
    patient = sample_patient(job, 0)
    bent = patient.hands[0].pose
    straight = dataclasses.replace(bent, wrist=0.0, bent=False)
    a, _ = build_skeleton(patient.anatomy, bent)
    b, _ = build_skeleton(patient.anatomy, straight)
    for c in FOREARM:
        assert np.allclose(a[c], b[c])
    for c in (*THUMB, *FINGERS[1]):
        assert np.abs(a[c] - b[c]).max() > 5.0  # mm


def test_overlap_at_the_real_rate_mostly_in_the_carpus(tmp_path: Path) -> None:
    """About 0.4 % of image pixels carry two labels (0.38 % at 2048 px; a little more at
    small sizes, where fillPoly paints both outlines of a joint), most of them in the
    carpus; the summary's count is the ground truth's."""
    size = 512
    summary = make_phantom(tmp_path, 3, 2, size=size, seed=SEED, workers=1, progress=False)
    multi = carpal = 0
    for _, path in pairs(tmp_path):
        m = masks(path, size)
        two = m.sum(0) >= 2
        multi += int(two.sum())
        carpal += int((two & m[list(CARPALS)].any(0)).sum())
    rate = multi / (10 * size * size)
    assert 0.003 < rate < 0.0055, rate
    assert carpal > 0.85 * multi
    assert summary.stats.multi_pixels == multi
    assert summary.stats.overlap_rate == pytest.approx(rate)


def test_artefacts_appear_at_their_rates() -> None:
    stats = planned_stats(1, 500, 500)
    n = 2000
    assert 0.03 * n < stats.artefacts["ring"] < 0.09 * n
    assert 0.02 * n < stats.artefacts["watch"] + stats.artefacts["bracelet"] < 0.08 * n
    assert min(stats.artefacts["watch"], stats.artefacts["bracelet"]) > 0
    assert 0.2 * n < stats.artefacts["text"] < 0.4 * n


def test_summary_counts_what_was_drawn(tmp_path: Path) -> None:
    """make_phantom's counts of bent wrists and artefacts are those of the plan's draws."""
    drawn = make_phantom(tmp_path, TRAIN, TEST, size=MIN_SIZE, seed=SEED, workers=1, progress=False)
    planned = planned_stats(SEED, TRAIN, TEST)
    assert (drawn.stats.bent, drawn.stats.artefacts) == (planned.bent, planned.artefacts)
    assert drawn.stats.images == {"test": 2 * TEST, "train": 2 * TRAIN}


@pytest.mark.parametrize(
    "artefacts",
    [
        Artefacts(ring=3),
        Artefacts(wrist="watch"),
        Artefacts(wrist="bracelet"),
        Artefacts(texts=("PA 7",)),
    ],
)
def test_artefacts_cover_the_image_but_not_the_labels(artefacts: Artefacts) -> None:
    """An artefact brightens part of the image; the bone polygons are exactly unchanged."""
    patient = sample_patient(plan_patients(2, 1, 0)[0], 2)
    hand = patient.hands[0]

    def draw(a: Artefacts | None) -> tuple[np.ndarray, list[np.ndarray]]:
        rng = copy.deepcopy(hand.rng)
        return draw_hand(patient.anatomy, hand.pose, SIZE, rng, patient.look, a)

    plain, plain_polys = draw(None)
    image, polys = draw(artefacts)
    assert all(np.array_equal(a, b) for a, b in zip(polys, plain_polys, strict=True))
    brighter = image.astype(int) - plain.astype(int) > 40
    assert 10 < brighter.sum() < 0.05 * SIZE * SIZE, brighter.sum()
    if artefacts.ring is not None:  # the ring lies over its finger's proximal phalanx
        proximal = np.zeros((SIZE, SIZE), np.uint8)
        cv2.fillPoly(proximal, [polys[DIGIT_CLASSES[artefacts.ring][1]]], 1)
        assert (brighter & (proximal > 0)).sum() > 5


def test_patients_differ_in_tissue_and_exposure() -> None:
    """Soft tissue and the processing curve vary between patients; a patient's two hands
    share them."""
    patients = [sample_patient(job, 0) for job in plan_patients(0, 40, 0)]
    tissue = [p.anatomy.tissue for p in patients]
    gamma = [p.look.gamma for p in patients]
    assert np.ptp(tissue) > 0.4 and np.ptp(gamma) > 0.3


def test_generated_set_passes_verify(root: Path) -> None:
    report = verify_dataset(root, workers=1, progress=False)
    assert report.ok, report.problems


# ----------------------------------------------------------------------- appearance
def _bone_and_tissue_contrast(root: Path) -> tuple[float, float]:
    """Means over training images of (bone grey - surrounding tissue grey) / tissue grey,
    and of the soft tissue's high-pass grain (grey levels, in a ring 2-4 px around the
    bones): measured from the PNGs and the JSONs only."""
    contrasts, grain = [], []
    for png in sorted((root / "train" / "DCM").rglob("*.png")):
        image = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE).astype(np.float64)
        label = root / "train" / "outputs_json" / png.parent.name / f"{png.stem}.json"
        bone = np.zeros(image.shape, np.uint8)
        polygons = load_annotation(label)
        for c in range(len(polygons)):
            cv2.fillPoly(bone, [polygons[c].astype(np.int32)], 1)
        near, far = (cv2.dilate(bone, np.ones((k, k), np.uint8)) for k in (5, 9))
        ring = (far - near) > 0  # soft tissue close to the bones
        contrasts.append((image[bone > 0].mean() - image[ring].mean()) / image[ring].mean())
        grain.append((image - cv2.GaussianBlur(image, (0, 0), 2))[ring].std())
    return float(np.mean(contrasts)), float(np.mean(grain))


def test_a_second_appearance_holds_the_same_hands_with_other_pixels(root: Path, tmp_path: Path):
    """``appearance="film"``: the same JSONs byte for byte (same hands, poses, labels) and
    other PNGs, with less bone-to-tissue contrast and more grain in the soft tissue (on
    this seed: contrast 0.83 -> 0.65, grain 4.4 -> 5.8 grey levels), as measured on the
    images; the default appearance is what ``make_phantom`` writes without one."""
    film = make_phantom(
        tmp_path / "film", TRAIN, TEST, size=SIZE, seed=SEED, workers=1, progress=False,
        appearance="film",
    ).root  # fmt: skip
    jsons = sorted(p.relative_to(root) for p in (root / "train" / "outputs_json").rglob("*.json"))
    assert jsons and all((root / p).read_bytes() == (film / p).read_bytes() for p in jsons)
    pngs = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert all((root / p).read_bytes() != (film / p).read_bytes() for p in pngs)
    default_contrast, default_grain = _bone_and_tissue_contrast(root)
    film_contrast, film_grain = _bone_and_tissue_contrast(film)
    assert film_contrast < 0.85 * default_contrast, (film_contrast, default_contrast)
    assert film_grain > 1.15 * default_grain, (film_grain, default_grain)
    again = make_phantom(tmp_path / "d", TRAIN, TEST, size=SIZE, seed=SEED, workers=1,
                         progress=False, appearance="default").root  # fmt: skip
    assert all((root / p).read_bytes() == (again / p).read_bytes() for p in pngs)


def test_an_unknown_appearance_is_refused_naming_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown appearance 'xray2'; valid: default, film"):
        make_phantom(tmp_path, 1, 1, size=MIN_SIZE, appearance="xray2", progress=False)
    assert not (tmp_path / "train").exists()
