"""Outputs that stand on their own: a task's head back on the merged body, file modes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import primerge

HEAD = r"^classifier\."


def test_load_task_model_puts_a_task_head_on_the_merged_body(bert_zoo, tmp_path):
    from transformers import BertForSequenceClassification

    out = tmp_path / "merged"
    primerge.merge(bert_zoo["base"], bert_zoo["models"], "prime", task_specific=HEAD, out=out)
    meta = json.loads((out / "task_heads" / "task1.json").read_text())
    assert meta["tensors"] == ["classifier.bias", "classifier.weight"]
    model = primerge.load_task_model(out, "task1")
    assert isinstance(model, BertForSequenceClassification) and model.config.num_labels == 3
    head = load_file(str(out / "task_heads" / "task1.safetensors"))
    body = load_file(str(out / "model.safetensors"))
    weights = model.state_dict()
    assert torch.equal(weights["classifier.weight"], head["classifier.weight"])
    assert all(torch.equal(weights[f"bert.{k}"], v) for k, v in body.items() if f"bert.{k}" in weights)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model.eval()(ids).logits.shape == (2, 3)
    with pytest.raises(primerge.InputError, match="no task head 'task9'.*task0, task1, task2"):
        primerge.load_task_model(out, "task9")
