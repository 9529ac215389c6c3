"""Published tensor-core peaks of common cards, for the plan's time floors.

Dense (no 2:4 sparsity) FP16/BF16 tensor-core throughput with FP32 accumulation, in
TFLOPS (a fused multiply-add counts 2, as ``FlopCounterMode`` counts), from NVIDIA's
datasheets; where a datasheet gives the figure "with sparsity" only, half of it.

* V100: Tesla V100 datasheet: 125 TFLOPS tensor (SXM2), 112 (PCIe); no BF16 (training
  runs fp16 with a grad scaler there).
* A10: NVIDIA A10 datasheet: BF16/FP16 tensor 125 TFLOPS (250 with sparsity).
* A10G (AWS G5): NVIDIA publishes no datasheet; AWS describes it as an A10 variant.
  Third-party comparisons (e.g. Baseten, "NVIDIA A10 vs A10G for ML model inference")
  give 70 TFLOPS FP16/BF16 tensor: listed, not verified.
* L4: NVIDIA L4 datasheet: FP16/BF16 tensor 242 TFLOPS with sparsity -> 121 dense.
* A100: NVIDIA A100 datasheet: BF16/FP16 tensor 312 TFLOPS (624 with sparsity), SXM4
  and PCIe alike.
* H100: NVIDIA H100 datasheet: BF16/FP16 tensor 1,979 TFLOPS (SXM5) and 1,513 (PCIe)
  with sparsity -> 989 and 756 dense.

A segmentation CNN reaches a fraction of these: depthwise convolutions (EfficientNet),
BatchNorm, activations, upsampling and the loss are memory-bound and not counted as
FLOPs; ``UTILISATION`` is the share assumed for the plan's estimate, a stated guess
until a GPU session measures the step time (``benchmarks/bench_plan.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    name: str
    tflops: float  # dense FP16/BF16 tensor-core peak
    memory_gib: float
    note: str


CARDS: tuple[Card, ...] = (
    Card("V100 SXM2", 125.0, 32, "fp16 only; PCIe 112 TFLOPS"),
    Card("A10", 125.0, 24, ""),
    Card("A10G", 70.0, 24, "no NVIDIA datasheet; third-party figure"),
    Card("L4", 121.0, 24, "242 with sparsity"),
    Card("A100", 312.0, 80, "SXM4 and PCIe; 40 or 80 GB"),
    Card("H100 SXM", 989.0, 80, "PCIe: 756 TFLOPS"),
)

UTILISATION = 0.30  # share of the tensor-core peak assumed for the estimate

EPOCH_IMAGES = 800  # the competition's training images (a fold trains on 4/5 of them)
TEST_IMAGES = 288  # the competition's test images


def card(name: str) -> Card:
    for c in CARDS:
        if c.name == name or c.name.split()[0] == name:
            return c
    raise KeyError(name)


def card_for(device_name: str) -> Card | None:
    """The table's card of a ``torch.cuda.get_device_name`` (None: not in the table). An
    H100 PCIe has its own peak (756 TFLOPS); an H200 is an H100 SXM's (989, NVIDIA H200
    datasheet: 1,979 with sparsity)."""
    name = device_name.upper()
    if "H100" in name and "PCIE" in name:
        return Card("H100 PCIe", 756.0, 80, "")
    if "H200" in name:
        return Card("H200", 989.0, 141, "")
    for key in ("H100", "A100", "V100", "A10G", "L4"):
        if key in name:
            return card(key)
    return card("A10") if "A10" in name else None


def seconds(flops: float, c: Card, utilisation: float = 1.0) -> float:
    return flops / (c.tflops * 1e12 * utilisation)
