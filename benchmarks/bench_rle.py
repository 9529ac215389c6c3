"""Benchmark: competition RLE of one image's 29 masks at 2048 x 2048, ours vs the classic code.

Measures, per image (median over repeats, real phantom masks: ``rasterize(polys, (2048,
2048))`` as bool):
  * ``bonecomp.rle.encode_many`` on the (29, 2048, 2048) stack (target >= 15x the classic),
  * ``bonecomp.rle.encode`` called per mask,
  * decoding the 29 strings (``bonecomp.rle.decode``), for information,
against the classic numpy encoder/decoder that public pipelines copied from the baseline
(``bonecomp.testing``). Every string must be byte-identical to the classic one and decode back
to the mask; the script exits 1 if not. A missed speed target only prints "below target".

Run from the repository root:

    .venv/bin/python benchmarks/bench_rle.py            # 2 patients = 4 images, 5 repeats
    .venv/bin/python benchmarks/bench_rle.py --quick    # smoke mode
"""

from __future__ import annotations

import numba
import numpy as np
from _common import (
    Row,
    base_parser,
    check,
    finish,
    median_time,
    phantom_root,
    print_machine,
    print_table,
)

from bonecomp import rle
from bonecomp.data.annotations import load_annotation
from bonecomp.data.layout import discover
from bonecomp.data.rasterize import rasterize
from bonecomp.testing import classic_decode, classic_encode

SRC = (2048, 2048)


# ------------------------------------------------------------------------------ benchmark
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--images", type=int, default=4, help="phantom images to encode")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.images, args.patients = 1, 1, 1
    failures: list[str] = []

    with phantom_root(args.data, max(args.patients, (args.images + 1) // 2), args.seed) as root:
        df = discover(root, "train").head(args.images)
        stacks = [rasterize(load_annotation(p), SRC).astype(bool) for p in df["json_path"]]
    n = len(stacks)
    print_machine(f", numba threads {numba.get_num_threads()}")
    print(f"{n} image(s), 29 masks of 2048 x 2048 each; {args.repeats} repeat(s)")

    # Correctness first (also warms up the numba kernels).
    for i, masks in enumerate(stacks):
        want = [classic_encode(m) for m in masks]
        many, single = rle.encode_many(masks), [rle.encode(m) for m in masks]
        check(many == want, f"image {i}: encode_many == classic, byte for byte", failures)
        check(single == want, f"image {i}: encode == classic, byte for byte", failures)
        back = all(np.array_equal(rle.decode(s, SRC), m) for s, m in zip(want, masks, strict=True))
        check(back, f"image {i}: decode(string) == mask", failures)
        cdec = all(
            np.array_equal(classic_decode(s, *SRC), m) for s, m in zip(want, masks, strict=True)
        )
        check(cdec, f"image {i}: classic decode(string) == mask", failures)

    strings = [[classic_encode(m) for m in masks] for masks in stacks]

    def per_image(fn) -> float:  # median time of one pass over all images, per image
        return median_time(lambda: [fn(i) for i in range(n)], args.repeats) / n

    t_many = per_image(lambda i: rle.encode_many(stacks[i]))
    t_single = per_image(lambda i: [rle.encode(m) for m in stacks[i]])
    t_classic = per_image(lambda i: [classic_encode(m) for m in stacks[i]])
    t_dec = per_image(lambda i: [rle.decode(s, SRC) for s in strings[i]])
    t_cdec = per_image(lambda i: [classic_decode(s, *SRC) for s in strings[i]])
    runs = np.mean([sum(len(s.split()) // 2 for s in ss) for ss in strings])
    print(f"mean runs per image: {runs:.0f}")
    print_table(
        "RLE of one image's 29 masks at 2048 x 2048 (time per image, median)",
        [
            Row("encode_many (29 masks)", t_many, t_classic, "s", target=15),
            Row("encode per mask (29 calls)", t_single, t_classic, "s"),
            Row("decode 29 strings", t_dec, t_cdec, "s"),
        ],
    )
    finish(failures)


if __name__ == "__main__":
    main()
