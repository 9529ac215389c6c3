"""Self-check of this machine for a recipe: run it first on a new machine.

python scripts/doctor.py                                      # configs/default.yaml
python scripts/doctor.py --config configs/unet_effb0_2048.yaml train.batch_size=4
python scripts/doctor.py --config configs/demo.yaml --quick   # on a CPU, in seconds
python scripts/doctor.py --plan --gpu-memory 32               # the GPU plan, no GPU needed

Prints one line per check (ok / warn / fail with the figure or what to do) and exits 1
if a check failed, else 0 (warnings allowed). With --plan it computes the recipe's GPU
memory and time instead (docs/doctor.md "The plan"), and exits 1 when not one image
fits the target even with gradient checkpointing.
"""

from __future__ import annotations

import sys

from bonecomp import cli
from bonecomp.doctor import exit_code, format_header, format_row, format_summary, run_checks


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller batches, fewer timed steps")
    ap.add_argument(
        "--plan", action="store_true",
        help="compute the GPU plan (memory, largest micro-batch, FLOPs, time) on any machine",
    )  # fmt: skip
    ap.add_argument(
        "--gpu-memory", type=float, default=24.0, metavar="GIB",
        help="--plan: the GPU's memory in GiB (default: %(default)s)",
    )  # fmt: skip
    args = cli.parse(ap, argv)
    return cli.run(lambda: doctor(args))


def doctor(args) -> int:
    cfg = cli.load(args)
    if args.plan:
        from bonecomp.plan import GiB, fits_at_all, format_plan, plan_recipe

        p = plan_recipe(cfg, int(args.gpu_memory * GiB), config=args.config)
        print(format_plan(p))
        return 0 if fits_at_all(p) else 1
    print(f"config: {args.config}\n{format_header()}", flush=True)
    rows = run_checks(cfg, args.quick, on_row=lambda row: print(format_row(row), flush=True))
    print(format_summary(rows))
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
