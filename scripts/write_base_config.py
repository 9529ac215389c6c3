"""Write configs/base.yaml and configs/schema.json from the models in bonecomp/config.py,
their only source.

    python scripts/write_base_config.py            # (or: make base-config)
    python scripts/write_base_config.py --check    # exit 1 when either file is stale

Every key's default and its doc (the comment) come from its declaration; the JSON Schema
(every key, its type, range and doc) is what editors complete and check recipes with
(each recipe's first line: ``# yaml-language-server: $schema=schema.json``). Run this
after adding or changing a key (tests/test_config.py fails until you do).
"""

from __future__ import annotations

import sys

from bonecomp import cli
from bonecomp.config import (
    BASE_YAML,
    SCHEMA_JSON,
    base_yaml,
    schema_json,
    write_base_yaml,
    write_schema,
)


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, config=False)
    ap.add_argument("--check", action="store_true", help="only say whether they are up to date")
    args = cli.parse(ap, argv)
    files = [(BASE_YAML, base_yaml, write_base_yaml), (SCHEMA_JSON, schema_json, write_schema)]
    if args.check:
        stale = [p for p, text, _ in files if not p.is_file() or p.read_text() != text()]
        for path, _, _ in files:
            print(f"{path}: {'stale: run make base-config' if path in stale else 'up to date'}")
        return int(bool(stale))
    for path, _, write in files:
        print(f"{'wrote' if write() else 'unchanged:'} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
