"""The committed generated code matches protos/ (regenerated into a temp dir and compared)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / "scripts/gen_protos.sh"), str(tmp_path)], check=True, cwd=ROOT)
    names = sorted(p.name for p in (ROOT / "verifier/v1").glob("*_pb2*.py*"))
    assert {"verifier_pb2.py", "verifier_pb2_grpc.py", "verifier_pb2.pyi", "envoy_key_pb2.py"} <= set(names)
    assert names == sorted(p.name for p in (tmp_path / "verifier/v1").glob("*_pb2*.py*"))
    for name in names:
        fresh = (tmp_path / "verifier/v1" / name).read_text()
        committed = (ROOT / "verifier/v1" / name).read_text()
        assert fresh == committed, f"verifier/v1/{name} is stale: run scripts/gen_protos.sh"
