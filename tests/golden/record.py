"""Record the golden hashes: ``python -m tests.golden.record`` (from the repository root)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from tests.golden.cases import CASES, build_zoo

HASHES = Path(__file__).with_name("hashes.json")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        zoo = build_zoo(root / "zoo")
        hashes = {name: case(zoo, root / "out" / name.replace("/", "_")) for name, case in CASES.items()}
    record = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
              "cases": hashes}
    HASHES.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"{len(hashes)} cases recorded in {HASHES}")


if __name__ == "__main__":
    main()
