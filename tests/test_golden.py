"""Outputs stay byte-identical: every golden case (tests/golden/cases.py) gives the SHA-256 of
every file and tensor recorded in tests/golden/hashes.json.

Bits of floating-point results may differ between CPU instruction sets and torch builds, so the
comparison runs where the recording was made's CPU capability and torch version match (the CI
and development machines); elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from golden.cases import CASES, build_zoo

RECORD = json.loads((Path(__file__).parent / "golden" / "hashes.json").read_text())
SAME_PLATFORM = (RECORD["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
                 and RECORD["torch"] == torch.__version__)


@pytest.fixture(scope="module")
def golden_zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("golden") / "zoo")


def test_every_case_is_recorded():
    assert sorted(RECORD["cases"]) == sorted(CASES)


@pytest.mark.skipif(not SAME_PLATFORM, reason=f"hashes recorded on {RECORD['cpu_capability']} / torch "
                    f"{RECORD['torch']}; bits may differ on another CPU or torch build")
@pytest.mark.parametrize("case", sorted(CASES))
def test_output_is_byte_identical(case, golden_zoo, tmp_path):
    out = tmp_path / "out" / "merged"
    assert CASES[case](golden_zoo, out) == RECORD["cases"][case]
