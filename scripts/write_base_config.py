"""Write configs/base.yaml from the models in bonecomp/config.py, its only source.

    python scripts/write_base_config.py            # (or: make base-config)
    python scripts/write_base_config.py --check    # exit 1 when the file is stale

Every key's default and its doc (the comment) come from its declaration (a field and the
docstring under it); run this after adding or changing one (tests/test_config.py fails
until you do).
"""

from __future__ import annotations

import sys

from bonecomp import cli
from bonecomp.config import BASE_YAML, base_yaml, write_base_yaml


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, config=False)
    ap.add_argument("--check", action="store_true", help="only say whether it is up to date")
    args = cli.parse(ap, argv)
    if args.check:
        stale = not BASE_YAML.is_file() or BASE_YAML.read_text() != base_yaml()
        print(f"{BASE_YAML}: {'stale: run make base-config' if stale else 'up to date'}")
        return int(stale)
    changed = write_base_yaml()
    print(f"{'wrote' if changed else 'unchanged:'} {BASE_YAML}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
