"""The committed generated code is exactly what ``proto/generate.py`` produces now."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "proto" / "mercato" / "v1"


def _load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    _load_generator().generate(tmp_path)
    fresh = sorted(p.name for p in (tmp_path / "mercato" / "v1").glob("*_pb2*.py*"))
    committed = sorted(p.name for p in GENERATED.glob("*_pb2*.py*"))
    assert fresh == committed, "run: .venv/bin/python proto/generate.py"
    stale = [
        name
        for name in fresh
        if not filecmp.cmp(tmp_path / "mercato" / "v1" / name, GENERATED / name, shallow=False)
    ]
    assert stale == [], f"stale generated code {stale}; run: .venv/bin/python proto/generate.py"


def test_every_field_and_enum_value_has_a_comment() -> None:
    missing = []
    for proto in sorted(GENERATED.glob("*.proto")):
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            is_member = (
                stripped.endswith(";")
                and "=" in stripped
                and not stripped.startswith(("syntax", "package", "import", "option", "//"))
            )
            if is_member and not lines[number - 1].strip().startswith("//"):
                missing.append(f"{proto.name}:{number + 1}: {stripped}")
    assert missing == []
