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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_output_file_gets_the_same_mode_under_the_umask(bert_zoo, tmp_path, umask):
    """Weight files used to be 0600 (safetensors' temporary file) beside 0644 configs."""
    import subprocess
    import sys

    out = tmp_path / "merged"
    code = (f"import os; os.umask({umask}); import primerge; primerge.merge({str(bert_zoo['base'])!r}, "
            f"{[str(m) for m in bert_zoo['models']]!r}, 'ties', task_specific={HEAD!r}, out={str(out)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and "task_heads/task0.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_verify_reports_hub_metadata_as_unlisted_not_as_corruption(bert_zoo, tmp_path, capsys):
    from primerge.cli import main as cli

    out = tmp_path / "merged"
    primerge.merge(bert_zoo["base"], bert_zoo["models"], "task_arithmetic", task_specific=HEAD, out=out)
    (out / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (out / ".cache" / "huggingface").mkdir(parents=True)
    (out / ".cache" / "huggingface" / "model.safetensors.metadata").write_text("x")
    assert cli.main(["verify", str(out)]) == 0
    text = capsys.readouterr().out
    assert "note .gitattributes: not listed in the manifest (hub or git metadata, not checked)" in text
    assert "OK:" in text
    (out / "notes.txt").write_text("x")  # anything else unlisted is still a problem
    assert cli.main(["verify", str(out)]) == 1
    assert "FAIL notes.txt: not listed in the manifest" in capsys.readouterr().out
