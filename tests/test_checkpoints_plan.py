"""Pre-flight (primerge.engine.preflight): `primerge plan` and `merge --dry-run` on a tiny Qwen3-MoE with
fused experts and a fine-tune that added tokens; merges that cannot fit are refused before they
start, with the numbers; every model's problem is reported at once."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

import primerge
from primerge.cli import main as cli
from primerge.util.errors import InputError, OutputError

from realmodels import build_base, fine_tune, save_state, state, tiny_config

transformers = pytest.importorskip("transformers")


def fuse(folder) -> None:
    """Re-save a transformers folder as its in-memory state dict (fused [E, m, n] experts)."""
    config, cls = tiny_config("qwen3_moe")
    model = cls.from_pretrained(folder)
    save_state(folder, {k: v.contiguous() for k, v in model.state_dict().items()})


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    build_base(root / "base", "qwen3_moe")
    fine_tune(root / "base", root / "chat", "qwen3_moe", 1, ["<|im_start|>", "<|im_end|>"])
    fine_tune(root / "base", root / "code", "qwen3_moe", 2)
    for name in ("base", "chat", "code"):
        fuse(root / name)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": "base", "models": ["chat", {"path": "code", "weight": 0.5}],
                                      "method": "prime", "tokenizer": "union"}))
    return root


def test_plan_reports_treatments_differences_and_resources(moe, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli.main(["plan", str(moe / "recipe.yaml"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    for needle in ["primerge plan: prime, 2 models, tokenizer: union",
                   "base: Qwen3MoeForCausalLM, float32 x", "vocabulary 64 rows",
                   "expert tensors (E matrices each)                4  (16 matrices)",
                   "vocabulary-aligned (rows by token string)       2",
                   "chat: 62 tokens in 64 rows (2 padding) aligned by token string; 2 tokens not in the base "
                   "(<|im_start|>, <|im_end|>) -> rows = weighted mean of the models that have them",
                   "code: 60 tokens in 64 rows (4 padding)",
                   "output vocabulary (union): 62 tokens in 64 rows (the base: 60 in 64)",
                   "peak memory  ~", "available)  ok", "output size  ~", "time         ~", "calibrated on",
                   "OK: the merge fits."]:
        assert needle in text, (needle, text)
    report = primerge.dry_run(moe / "recipe.yaml", out=out)
    result = primerge.merge_recipe(moe / "recipe.yaml", out=out)
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "README.md"
                  and p.name != "primerge-manifest.json")
    assert abs(report.output - written) <= 0.02 * written, (report.output, written)
    assert result.counts["experts"] == 4 and result.counts["vocab_aligned"] == 2
    transformers.AutoModelForCausalLM.from_pretrained(out)


def test_dry_run_prints_the_plan_and_writes_nothing(moe, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli.main(["merge", str(moe / "recipe.yaml"), "--out", str(out), "--dry-run"]) == 0
    assert "Tensors by treatment" in capsys.readouterr().out
    assert not out.exists() and not any(tmp_path.iterdir())


def test_a_merge_that_does_not_fit_in_memory_is_refused_with_the_numbers(moe, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli.main(["merge", str(moe / "recipe.yaml"), "--out", str(out), "--max-memory", "1MB", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("primerge: error: the merge needs ~") and "MiB of memory at its peak, 976.6 KiB allowed" in err
    assert not out.exists() and not any(tmp_path.iterdir())
    assert cli.main(["plan", str(moe / "recipe.yaml"), "--max-memory", "1MB"]) == 2
    captured = capsys.readouterr()
    assert "TOO BIG" in captured.out and "REFUSED: the merge needs" in captured.out
    with pytest.raises(InputError, match="of memory at its peak"):
        primerge.merge_recipe(moe / "recipe.yaml", max_memory="1MB")


def test_an_output_larger_than_the_free_disk_is_refused(moe, tmp_path, monkeypatch):
    from primerge.engine import preflight as module

    monkeypatch.setattr(module, "free_disk", lambda out: (1000, tmp_path))  # a nearly full disk
    with pytest.raises(OutputError, match=r"the output needs ~.* on disk, 1000 B free at"):
        primerge.merge_recipe(moe / "recipe.yaml", out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_every_models_problem_is_reported_at_once(moe, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(moe / "code", broken)
    tensors = state(broken)
    del tensors["model.norm.weight"]
    save_state(broken, tensors)
    wide = tmp_path / "wide"
    shutil.copytree(moe / "code", wide)
    tensors = state(wide)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(33, 32)
    save_state(wide, tensors)
    with pytest.raises(InputError) as info:
        primerge.merge(moe / "base", [broken, moe / "chat", wide], "task_arithmetic")
    lines = str(info.value).splitlines()
    assert lines[0] == "2 models cannot be merged with this base:"
    assert "'model.norm.weight'" in lines[1] and "q_proj.weight': shape [33, 32]" in lines[2]
