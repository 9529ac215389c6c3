"""Self-check of this machine for a recipe: run it first on a new machine.

python scripts/doctor.py                                      # configs/default.yaml
python scripts/doctor.py --config configs/unet_effb0_2048.yaml train.batch_size=4
python scripts/doctor.py --quick                              # fewer, smaller timings

Prints one line per check (ok / warn / fail with the figure or what to do) and exits 1
if a check failed, else 0 (warnings allowed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bonecomp.config import ConfigError, load_config
from bonecomp.doctor import exit_code, format_header, format_row, format_summary, run_checks

DEFAULT, FALLBACK = Path("configs/default.yaml"), Path("configs/unetpp_effb4_1024.yaml")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=None, help=f"recipe YAML (default {DEFAULT})")
    ap.add_argument("--quick", action="store_true", help="smaller batches, fewer timed steps")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=4")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after flags
    path = args.config or (DEFAULT if DEFAULT.is_file() else FALLBACK)
    try:
        cfg = load_config(path, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    note = "" if args.config or path == DEFAULT else f" ({DEFAULT} not found)"
    print(f"config: {path}{note}\n{format_header()}", flush=True)
    rows = run_checks(cfg, args.quick, on_row=lambda row: print(format_row(row), flush=True))
    print(format_summary(rows))
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
