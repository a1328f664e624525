"""Fine-tuning on answer tokens (LoRA and full), the cached zoo, and ``primerge demo --suite llm`` end to
end on a tiny random LLaMA with two local tasks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llm_fixtures import byte_level_tokenizer, save_tiny_llama, tiny_llama
from primerge.cli.main import main
from primerge.evaluation.llm.prompts import Verbaliser, cast_task, split_answer
from primerge.evaluation.llm.training import TrainSettings, class_scores, encode_examples, fine_tune, ranking_loss
from primerge.evaluation.llm.zoo import LLMProtocol
from primerge.data.tasks import TaskData

pytest.importorskip("lm_eval")
pytest.importorskip("peft")

WORDS = ("posit", "negative")  # a single-token and a multi-token answer


def toy_task(n: int = 40, name: str = "toy") -> TaskData:
    texts = tuple(f"{'the pot' if i % 2 else 'a nose'} {i} is on it" for i in range(n))
    return TaskData(name, ("p", "n"), texts, tuple(i % 2 for i in range(n)), "test")


def cast(tokenizer, train=16, test=8):
    return cast_task(toy_task(80).split(), tokenizer, 24, train, test, Verbaliser("Text: {text}\nAnswer:", WORDS))


def direct_score(model, prompt, answer) -> float:
    """log p(answer | prompt) from one unpadded forward pass."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    return sum(logprobs[len(prompt) - 1 + j, t].item() for j, t in enumerate(answer))


@pytest.mark.parametrize("words", [WORDS, ("posit", "the")], ids=["multi-token", "single-token"])
def test_class_scores_equal_unpadded_loglikelihoods(words):
    """Left-padded batches (one forward per class, or one shared forward for single-token answers) give
    every class's answer log-likelihood, and the loss is the cross-entropy over those scores."""
    model, tokenizer = tiny_llama(seed=4), byte_level_tokenizer()
    task = cast_task(toy_task(80).split(), tokenizer, 24, 6, 4, Verbaliser("Text: {text}\nAnswer:", words))
    examples = encode_examples(task, tokenizer, 6)
    assert {len(a) for candidates, _ in examples for _, a in candidates} == ({1} if words[1] == "the" else {1, 7})
    with torch.no_grad():
        scores = class_scores(model, [c for c, _ in examples], tokenizer.pad_token_id, "cpu")
        loss = ranking_loss(model, examples, tokenizer.pad_token_id, "cpu").item()
    direct = torch.tensor([[direct_score(model, p, a) for p, a in candidates] for candidates, _ in examples],
                          dtype=torch.float64)
    assert torch.allclose(scores.double(), direct.double(), atol=1e-4)
    expected = -torch.log_softmax(direct, -1)[range(6), [y for _, y in examples]].mean().item()
    assert loss == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fine_tune_lowers_the_answer_loss_and_trains_the_right_parameters(kind):
    tokenizer = byte_level_tokenizer()
    task = cast(tokenizer, train=32)
    model = tiny_llama(seed=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = encode_examples(task, tokenizer, 32)
    with torch.no_grad():
        start = ranking_loss(model, examples, tokenizer.pad_token_id, "cpu").item()
    settings = TrainSettings(kind=kind, steps=8, batch_size=4, learning_rate=3e-3 if kind == "lora" else 1e-3)
    trained, stats = fine_tune(model, tokenizer, task, settings, progress=False)
    with torch.no_grad():
        assert ranking_loss(trained, examples, tokenizer.pad_token_id, "cpu").item() < start
    assert stats["steps"] == 8 and stats["examples"] == 32
    if kind == "lora":
        assert stats["trained_parameters"] == sum(p.numel() for n, p in trained.named_parameters() if "lora_" in n)
        frozen = {k.replace(".base_layer", ""): v for k, v in trained.get_base_model().state_dict().items()
                  if "lora_" not in k}
        assert frozen.keys() == before.keys() and all(torch.equal(before[k], v) for k, v in frozen.items())
    else:
        after = trained.state_dict()
        assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
        assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])


def write_jsonl(path, task: TaskData):
    labels = ["posit", "the"]
    path.write_text("\n".join(json.dumps({"text": t, "label": labels[y]}) for t, y in zip(task.texts, task.labels)) + "\n")
    return path


@pytest.mark.slow
def test_llm_demo_end_to_end_and_cached_rerun(tmp_path, capsys, monkeypatch):
    import primerge.evaluation.llm.demo as demo_module
    import primerge.evaluation.llm.zoo as zoo_module
    from primerge.cli import llm as llm_cli

    tiny = LLMProtocol(max_prompt_tokens=48, test_size=8, steps=3, batch_size=4, lora_rank=2,
                       lora_learning_rate=3e-3, full_learning_rate=1e-3, eval_batch_size=8)
    monkeypatch.setitem(llm_cli.PRESETS, "cpu", tiny)
    base = save_tiny_llama(tmp_path / "base", seed=7)
    tasks = [str(write_jsonl(tmp_path / f"{n}.jsonl", toy_task(30, n))) for n in ("alpha", "beta")]
    argv = ["demo", "--suite", "llm", "--base", str(base), "--tasks", *tasks, "--cache", str(tmp_path / "cache"),
            "--report", str(tmp_path / "report"), "--methods", "task_arithmetic", "prime", "--as-lora", "prime",
            "--as-lora-rank", "4", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "LoRA adapters" in out and "Full fine-tunes" in out and "prime → LoRA r4" in out
    record = json.loads((tmp_path / "report" / "llm-results.json").read_text())
    assert [r["row"] for r in record["tables"]["lora"]] == ["Zero-shot base", "Individual", "task_arithmetic", "prime",
                                                             "prime → LoRA r4"]
    assert [r["row"] for r in record["tables"]["full"]] == ["Zero-shot base", "Individual", "task_arithmetic", "prime"]
    for rows in record["tables"].values():
        assert rows[0]["accuracy"] == record["tables"]["lora"][0]["accuracy"]  # one zero-shot evaluation
        assert all(0.0 <= v <= 1.0 for r in rows for v in r["accuracy"].values())
    assert record["tables"]["lora"][-1]["parameters"]["lora_rank"] == 4
    for suffix in (".md", ".csv", ".png"):
        assert (tmp_path / "report" / f"llm-results{suffix}").stat().st_size > 0
    zoo_root = tmp_path / "cache" / "llm" / "zoo"
    adapters = sorted(zoo_root.glob("lora-*/*/adapter_model.safetensors"))
    fulls = sorted(zoo_root.glob("full-*/*/model.safetensors"))
    assert len(adapters) == len(fulls) == 2
    assert set(load_file(fulls[0])) == set(load_file(base / "model.safetensors"))

    def refuse(*args, **kwargs):
        raise AssertionError("a cached rerun must not train")

    monkeypatch.setattr(zoo_module, "fine_tune", refuse)
    monkeypatch.setattr(demo_module, "evaluate_prompt_tasks", refuse)  # every score comes from the cache
    assert main(argv) == 0
    again = json.loads((tmp_path / "report" / "llm-results.json").read_text())
    for kind in ("lora", "full"):
        assert [r["accuracy"] for r in again["tables"][kind]] == [r["accuracy"] for r in record["tables"][kind]]


def test_answer_tokens_follow_the_prompt():
    tokenizer = byte_level_tokenizer()
    task = cast(tokenizer)
    (candidates, label), = encode_examples(task, tokenizer, 1)
    assert label == task.train_labels[0] and len(candidates) == 2
    for c, (prompt, answer) in enumerate(candidates):
        assert (prompt, answer) == split_answer(tokenizer, task.train_prompts[0], task.verbaliser.answer(c))
        assert tokenizer.decode(answer) == " " + WORDS[c]


@pytest.mark.parametrize("extra, message", [
    (["--zoos", "partial"], "unknown zoo kind partial"),
    (["--pave", "prime"], "--pave: option(s) of the encoder suite; drop them or use --suite encoder."),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--methods", "primo"], "Did you mean 'prime'"),
    pytest.param(["--device", "cuda"], "no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
])
def test_llm_demo_bad_options_are_one_clear_error(tmp_path, capsys, extra, message):
    code = main(["demo", "--suite", "llm", "--cache", str(tmp_path), "--report", str(tmp_path / "r"), "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "llm").exists() and not (tmp_path / "r").exists()
