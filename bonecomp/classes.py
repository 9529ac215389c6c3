"""The 29 bone classes in competition order (channels and submission rows).

This is the only place the class names are written out; everything else imports them.
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = (
    *(f"finger-{i}" for i in range(1, 20)),
    "Trapezium",
    "Trapezoid",
    "Capitate",
    "Hamate",
    "Scaphoid",
    "Lunate",
    "Triquetrum",
    "Pisiform",
    "Radius",
    "Ulna",
)
NUM_CLASSES: int = len(CLASSES)
CLASS_TO_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}

# Anatomical grouping by index, used by the phantom and by per-group reports.
THUMB: tuple[int, ...] = (0, 1, 2)  # distal phalanx, proximal phalanx, metacarpal
FINGERS: tuple[tuple[int, ...], ...] = tuple(
    tuple(range(3 + 4 * f, 7 + 4 * f)) for f in range(4)
)  # index, middle, ring, little: distal, middle, proximal phalanx, metacarpal
CARPALS: tuple[int, ...] = tuple(range(19, 27))
FOREARM: tuple[int, ...] = (27, 28)

assert NUM_CLASSES == 29
assert sorted(THUMB + sum(FINGERS, ()) + CARPALS + FOREARM) == list(range(NUM_CLASSES))
