"""Record the golden references: ``python -m tests.golden.record`` (from the repository root).

Writes ``hashes.json`` (the recording platform and the SHA-256 of every file and tensor of every
case) and ``reference.safetensors`` (every tensor of every case, keyed ``case|key``), the values that
other platforms compare with under each case's tolerance.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.golden.cases import CASES, build_zoo, digest
from primerge.util.platform import machine_kind

HERE = Path(__file__).parent
HASHES, REFERENCE = HERE / "hashes.json", HERE / "reference.safetensors"


def main() -> None:
    hashes, tensors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        zoo = build_zoo(root / "zoo")
        for name, case in CASES.items():
            output = case.run(zoo, root / "out" / name.replace("/", "_"))
            hashes[name] = {key: digest(value) for key, value in output.items()}
            tensors.update({f"{name}|{key}": value.clone() for key, value in output.items()
                            if isinstance(value, torch.Tensor)})
    HASHES.write_text(json.dumps({"platform": machine_kind(), "cases": hashes}, indent=1, sort_keys=True) + "\n")
    save_file(tensors, str(REFERENCE))
    print(f"{len(hashes)} cases, {len(tensors)} tensors recorded in {HASHES.name} and {REFERENCE.name}")


if __name__ == "__main__":
    main()
