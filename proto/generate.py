"""Generate the Python code for every ``.proto`` under ``proto/`` (the one command).

Usage: ``python proto/generate.py [--out DIR]``. Without ``--out`` the code is written
beside the ``.proto`` sources, which is where the package ``mercato.v1`` is imported
from. ``tests/proto/test_generated_fresh.py`` regenerates into a temporary folder and
fails when the committed code differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent


def proto_sources() -> list[Path]:
    return sorted(PROTO_ROOT.glob("mercato/**/*.proto"))


def generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc  # imported here: a build-time tool only

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_sources()]
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output folder")
    args = parser.parse_args(argv)
    generate(args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
