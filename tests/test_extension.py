"""Extending the engine is adding a class and registering it: an output format and an input kind,
each written here as a user would, run end to end through ``primerge.merge``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import primerge
from primerge.io.readers import open_checkpoint
from primerge.output import base as output_base
from primerge.output.base import MergedTensor, MergeResult, TensorSink
from primerge.core import sources as taskvectors
from primerge.core.sources import FullFineTune

from golden.cases import build_zoo


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("ext") / "zoo")


class WeightsOnly(TensorSink):
    """One ``weights.safetensors`` file, nothing else (no card, config or manifest)."""

    def __init__(self, out: Path, recipe, *, force: bool, shard_size: int) -> None:
        self.out, self.tensors = Path(out), {}

    def add(self, merged: MergedTensor) -> None:
        self.tensors[merged.name] = merged.value

    def finish(self, result: MergeResult) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors, str(self.out / "weights.safetensors"))
        result.out = self.out


@pytest.fixture
def weights_format():
    output_base.output_format("weights")(WeightsOnly)
    yield
    del output_base.FORMATS["weights"]


def test_a_new_output_format_is_one_class_and_one_registration(small_zoo, tmp_path, weights_format):
    models = [small_zoo["t0"], small_zoo["t1"]]
    reference = primerge.merge(small_zoo["base"], models, "ties", task_specific=r"^score\.").state_dict
    from primerge.api import merge_recipe
    from primerge.core.recipe import build_recipe

    recipe = build_recipe({"base": small_zoo["base"], "models": models, "method": "ties",
                           "task_specific": r"^score\.", "output": {"format": "weights"}})
    merge_recipe(recipe, out=tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["weights.safetensors"]
    written = load_file(str(tmp_path / "w" / "weights.safetensors"))
    assert written.keys() == reference.keys()
    assert all(torch.equal(written[k], reference[k]) for k in reference)


class Negated(FullFineTune):
    """An input kind: a ``.negated`` folder holds θ₀ − τ, i.e. it contributes −τ (task negation)."""

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.suffix == ".negated"

    def delta(self, entry, base, out) -> None:
        super().delta(entry, base, out)
        out.neg_()


def test_a_new_input_kind_is_one_class_and_one_registration(small_zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(taskvectors, "SOURCE_KINDS", list(taskvectors.SOURCE_KINDS))
    taskvectors.source_kind(Negated)
    negated = tmp_path / "t0.negated"
    negated.symlink_to(small_zoo["t0"], target_is_directory=True)
    plain = primerge.merge(small_zoo["base"], [small_zoo["t0"]], "task_arithmetic", task_specific=r"^score\.")
    neg = primerge.merge(small_zoo["base"], [negated], "task_arithmetic", task_specific=r"^score\.")
    base = open_checkpoint(small_zoo["base"])
    for name in base.names:
        if base.info(name).dtype.is_floating_point:
            theta0 = base.load(name).float()
            torch.testing.assert_close(neg.state_dict[name] - theta0, -(plain.state_dict[name] - theta0))
