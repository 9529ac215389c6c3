"""The training sample: what every training and validation item carries, declared once.

An item is a dict of *fields*. ``FIELDS`` (a ``bonecomp.registry.Registry``) holds each
field's declaration: how it is made from the item's parts (``Item``: its image and mask
after augmentation and the patch cut, its index, the patch's origin, whether its
targets are soft, whether it is a pseudo-label item), the dtype it travels in from the
DataLoader workers, and how ``engine.to_device`` converts it on the device. Both
datasets (``BoneDataset``, ``PseudoDataset``), whole-image and patch items alike, end in
the same call, ``Sample.item``, so every item of a loader carries the same keys by
construction; the loaders collate with ``Sample.collate``, the batch-size probe and the
doctor make their batches the same way.

Built in (always, in this order):

- ``image``: (P, P) uint8 grey; on the device (3, P, P) float in [0, 1] (grey as RGB);
- ``mask``: (C, P, P) uint8, {0, 1} or with soft targets coverage 0..255; on the device
  float in [0, 1];
- ``index``: the cache row (pseudo-label rows follow the cache's rows);
- ``origin``: (y0, x0) of the patch in the augmented image, patch items only.

A user field is one ``register_field`` call (docs/extending.md); it is computed only
when a configured loss term declares that it reads it
(``register_loss(name, builder, fields=("distance",))``), so an unused field costs
nothing, and an unknown one is refused at the config check naming ``loss.terms``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from bonecomp.classes import NUM_CLASSES
from bonecomp.registry import Registry

IMAGE, MASK, INDEX, ORIGIN = "image", "mask", "index", "origin"
BASE = (IMAGE, MASK, INDEX)  # every item; ORIGIN is added for patches


@dataclass(frozen=True)
class Item:
    """What a dataset has of one item when its augmentation and patch cut are done: what
    a field's ``make`` gets."""

    image: np.ndarray  # (P, P) uint8 grey
    mask: np.ndarray  # (C, P, P) uint8: {0, 1}, or coverage 0..255 when ``soft``
    index: int  # the cache row; a pseudo-label item's follows the cache's rows
    soft: bool = False  # ``mask`` holds coverage 0..255 (soft targets, pseudo probabilities)
    origin: tuple[int, int] | None = None  # (y0, x0) of a patch; None for a whole image
    pseudo: bool = False  # a pseudo-label item (its mask is an ensemble's prediction)

    def target(self) -> np.ndarray:
        """(C, P, P) float32 in [0, 1]: the mask exactly as the loss sees ``batch["mask"]``."""
        m = self.mask.astype(np.float32)
        return m / np.float32(255) if self.soft else m


@dataclass(frozen=True)
class Field:
    """A registered field: ``make(item)`` gives its value (an array, tensor or number);
    ``dtype`` is the tensor dtype it is stored and collated in (None: as ``make`` returns
    it, numbers collate to a tensor); ``on_device(tensor, soft)`` converts the batch's
    tensor after its transfer (None: unchanged; ``soft``: ``data.soft_targets``)."""

    make: Callable[[Item], Any]
    dtype: torch.dtype | None = None
    on_device: Callable[[torch.Tensor, bool], torch.Tensor] | None = None
    doc: str = ""

    def of(self, item: Item) -> Any:
        value = self.make(item)
        if self.dtype is None:
            return value
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        return torch.as_tensor(value).to(self.dtype)


FIELDS: Registry[Field] = Registry("sample field", "loss.terms")


def register_field(
    name: str,
    make: Callable[[Item], Any] | None = None,
    *,
    dtype: torch.dtype | None = torch.float32,
    device_dtype: torch.dtype | None = None,
    on_device: Callable[[torch.Tensor, bool], torch.Tensor] | None = None,
    doc: str = "",
    replace: bool = False,
):
    """Declare the sample field ``name``: ``register_field(name, make)``, or
    ``@register_field(name)`` over ``make``; returns ``make``.

    ``make(item: Item)`` runs in the DataLoader workers for every training and validation
    item (whole image, patch, pseudo-label) whose loss needs the field, on the item's
    final image and mask (``item.target()``: the mask as float in [0, 1], as the loss sees
    it), and returns a value of fixed shape, typically (..., P, P). It is stored as
    ``dtype`` (float16 or uint8 carry less through the workers and to the device);
    ``device_dtype`` converts it after the transfer (``on_device(tensor, soft)`` for any
    other conversion). A loss term reads it as ``batch[name]`` once it declares it:
    ``register_loss(term, builder, fields=(name,))``.
    """
    if device_dtype is not None and on_device is not None:
        raise ValueError(f"sample field {name!r}: give device_dtype or on_device, not both")
    if device_dtype is not None:
        on_device = partial(_to_dtype, dtype=device_dtype)

    def add(fn: Callable[[Item], Any]) -> Callable[[Item], Any]:
        field = Field(fn, dtype, on_device, doc or (fn.__doc__ or ""))
        FIELDS.register(name, field, replace=replace)
        return fn

    return add if make is None else add(make)


def _to_dtype(t: torch.Tensor, soft: bool, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype)


# ----------------------------------------------------------------------------- built-ins
def to_float_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 grey (..., H, W) -> float (..., 3, H, W) in [0, 1] (grey as RGB)."""
    x = image.float().div_(255).unsqueeze(-3)
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()


def to_float_mask(mask: torch.Tensor, soft: bool) -> torch.Tensor:
    """uint8 masks -> float in [0, 1]: {0, 1} as they are, coverage 0..255 scaled."""
    m = mask.float()
    return m.div_(255) if soft else m


def _image_on_device(t: torch.Tensor, soft: bool) -> torch.Tensor:
    return to_float_image(t) if t.dtype == torch.uint8 else t


def _mask_on_device(t: torch.Tensor, soft: bool) -> torch.Tensor:
    return to_float_mask(t, soft) if t.dtype == torch.uint8 else t


def _image(item: Item) -> np.ndarray:
    return item.image


def _mask(item: Item) -> np.ndarray:
    return item.mask


def _index(item: Item) -> int:
    return item.index


def _origin(item: Item) -> tuple[int, int] | None:
    return item.origin


FIELDS.register(IMAGE, Field(_image, torch.uint8, _image_on_device, "(P, P) uint8 grey"))
FIELDS.register(MASK, Field(_mask, torch.uint8, _mask_on_device, "(C, P, P) uint8 targets"))
FIELDS.register(INDEX, Field(_index, None, None, "the cache row"))
FIELDS.register(ORIGIN, Field(_origin, torch.int64, None, "(y0, x0) of a patch"))


# ------------------------------------------------------------------------------ contract
class Sample:
    """The keys of one loader's items and how each is made: ``BASE``, ``ORIGIN`` for
    patch items, then the user ``fields`` (their order; each once; ``extra``).

    An unknown field name is a ``ConfigError`` naming ``loss.terms`` (``check_config``
    refuses it before any work). ``compact`` (training) keeps the image and mask uint8
    through the workers, converted on the device by ``engine.to_device``; otherwise the
    item holds what ``to_device`` would make of it (float image and mask).
    """

    def __init__(
        self, fields: Iterable[str] = (), *, patch: bool = False, compact: bool = True
    ) -> None:
        builtin = (*BASE, *((ORIGIN,) if patch else ()))
        self.extra = tuple(n for n in dict.fromkeys(fields) if n not in builtin)
        self.fields = {name: FIELDS.get(name) for name in (*builtin, *self.extra)}
        self.patch, self.compact = patch, compact

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key of an item, in order."""
        return tuple(self.fields)

    def __repr__(self) -> str:
        return f"Sample({', '.join(self.keys)}{'' if self.compact else '; float'})"

    def item(self, item: Item) -> dict[str, Any]:
        """The training item: every field of the contract made from ``item``."""
        if (item.origin is not None) != self.patch:
            what = "a patch" if item.origin is not None else "a whole image"
            raise ValueError(f"{self!r} got {what} (item {item.index})")
        out = {name: field.of(item) for name, field in self.fields.items()}
        if not self.compact:
            for name, field in self.fields.items():
                if field.on_device is not None:
                    out[name] = field.on_device(out[name], item.soft)
        return out

    def collate(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The batch of ``items``: each key stacked (``default_collate``). Items must carry
        the contract's keys and all the same keys (a batch that mixes item kinds, say real
        and pseudo-label items, fails here in one line naming the key)."""
        return collate(items, self.keys)

    def synthetic(self, side: int, soft: bool, seed: int = 0) -> dict[str, Any]:
        """A random item of ``side`` px through the contract (every field made from it):
        for the batch-size probe and the doctor when they have no training item."""
        rng = np.random.default_rng(seed)
        image = rng.integers(0, 256, (side, side), dtype=np.uint8)
        mask = rng.integers(0, 256, (NUM_CLASSES, side, side), dtype=np.uint8)
        if not soft:
            mask = (mask > 230).astype(np.uint8)
        return self.item(
            Item(image, mask, index=0, soft=soft, origin=(0, 0) if self.patch else None)
        )


def collate(items: Sequence[Mapping[str, Any]], keys: Sequence[str] = ()) -> dict[str, Any]:
    """``default_collate`` of dict items, after checking that each holds ``keys`` and the
    keys of the first item, no more, no fewer."""
    first = list(items[0])
    want = set(first) | set(keys)
    for i, it in enumerate(items):
        if set(it) != want:
            missing, extra = sorted(want - set(it)), sorted(set(it) - want)
            idx = it.get(INDEX, f"#{i}")
            raise ValueError(
                f"item {idx} of a batch does not carry the sample's keys: "
                f"{'missing ' + str(missing) if missing else ''}"
                f"{' ' if missing and extra else ''}{'extra ' + str(extra) if extra else ''}; "
                "every item must be built by bonecomp.data.sample.Sample.item"
            )
    return default_collate(list(items))


def convert_fields(batch: dict[str, Any], soft: bool) -> dict[str, Any]:
    """Each registered field of a batch on the device converted by its ``on_device`` (in
    place; ``soft``: ``data.soft_targets``); other keys as they are."""
    for name in list(batch):
        field = FIELDS.get(name) if name in FIELDS else None
        if field is not None and field.on_device is not None:
            batch[name] = field.on_device(batch[name], soft)
    return batch
