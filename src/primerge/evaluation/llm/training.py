"""Fine-tuning a causal LM on a cast task, both ways: LoRA adapters and full fine-tunes.

The model is trained to rank the answers the way lm-eval's ``acc`` decides. For a prompt x, the
score of class c is the log-likelihood of its answer tokens a_c,1..k (over the full vocabulary),
s_c = Σ_j log p(a_c,j | x, a_c,<j), lm-eval predicts argmax_c s_c, and the loss is the
cross-entropy of the true class under softmax_c(s_c), averaged over the batch. (The plain
language-modelling loss on the answer tokens spends a small step budget mostly on making the label
words likely at all: measured on SmolLM2, six such LoRA steps left two of four tasks at the
zero-shot accuracy.) Logits are computed at the answer positions only: sequences are left-padded so
every answer ends at the last position and the model is called with ``logits_to_keep = k_max``
(position ids count real tokens, so padding changes nothing). When every answer is one token, the
classes share one forward on the prompt and s_c is read from its last position; otherwise each
class's answer is scored by its own sequence. The 49152-row output head, a fifth of SmolLM2's
forward cost per position, runs on one position per prompt instead of ~30.

- **LoRA**: peft ``LoraConfig(r, lora_alpha = 2r, dropout 0)`` on every linear layer of the
  decoder (q, k, v, o, gate, up, down); only the adapters train.
- **Full**: every decoder-layer weight and norm trains; the token embedding (tied to the output
  head: 28M of SmolLM2's 134.5M parameters) stays frozen. Merging methods treat the embedding as a
  non-matrix tensor (averaged), and freezing it saves its AdamW state and update; that it is what
  fits the CPU budget is measured in docs/benchmarks.md, "LLM results".

AdamW (weight decay 0), linear warm-up over the first 10% of steps then linear decay to 0, one pass
over ``steps × batch_size`` training examples in a seeded order. Deterministic on CPU for a seed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from primerge.evaluation.llm.prompts import PromptTask, split_answer
from primerge.evaluation.zoo import warmup_linear

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainSettings:
    """How one fine-tune trains (``kind`` is 'lora' or 'full')."""

    kind: str
    steps: int
    batch_size: int
    learning_rate: float
    lora_rank: int = 16
    warmup_fraction: float = 0.1
    seed: int = 0


Candidates = list[tuple[list[int], list[int]]]  # one (prompt ids, answer ids) per class


def encode_examples(task: PromptTask, tokenizer, count: int) -> list[tuple[Candidates, int]]:
    """For each of the first ``count`` training examples: every class's (prompt ids, answer ids), and
    the label."""
    return [([split_answer(tokenizer, prompt, task.verbaliser.answer(c)) for c in range(len(task.classes))], label)
            for prompt, label in zip(task.train_prompts[:count], task.train_labels[:count])]


def left_padded(sequences: Sequence[tuple[list[int], list[int]]], pad_id: int, device) -> dict:
    """Batch tensors with every (prompt, answer) sequence right-aligned: input ids, attention mask,
    position ids (0 at each sequence's first real token), and the answer targets aligned to the last
    k_max logits (-100 where a shorter answer leaves no target)."""
    length = max(len(p) + len(a) for p, a in sequences)
    k_max = max(len(a) for _, a in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    targets = torch.full((len(sequences), k_max), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(sequences):
        sequence = prompt + answer
        ids[row, length - len(sequence):] = torch.tensor(sequence)
        mask[row, length - len(sequence):] = 1
        targets[row, k_max - len(answer):] = torch.tensor(answer)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # logits at position t predict token t + 1: the answer's k tokens are predicted by the k
    # positions ending one before the last, so the model input drops the final token.
    batch = {"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1], "position_ids": positions[:, :-1]}
    return {**{k: v.to(device) for k, v in batch.items()}, "targets": targets.to(device), "k_max": k_max}


def answer_logprobs(model, batch: dict) -> torch.Tensor:
    """Σ_j log p(a_j | x, a_<j) of every sequence's answer, from logits at the last k_max positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=batch["k_max"]).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = batch["targets"]
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != -100)).sum(-1)


def class_scores(model, examples: Sequence[Candidates], pad_id: int, device) -> torch.Tensor:
    """s[i, c] = log-likelihood of class c's answer after example i's prompt (module docstring)."""
    if all(len(answer) == 1 for candidates in examples for _, answer in candidates):
        batch = left_padded([candidates[0] for candidates in examples], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=1).logits[:, -1]
        answers = torch.tensor([[a[0] for _, a in candidates] for candidates in examples], device=logits.device)
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, answers)
    flat = [candidate for candidates in examples for candidate in candidates]
    return answer_logprobs(model, left_padded(flat, pad_id, device)).view(len(examples), -1)


def ranking_loss(model, examples: Sequence[tuple[Candidates, int]], pad_id: int, device) -> torch.Tensor:
    """Cross-entropy of the true classes under softmax over the class scores."""
    scores = class_scores(model, [candidates for candidates, _ in examples], pad_id, device)
    labels = torch.tensor([label for _, label in examples], device=scores.device)
    return nn.functional.cross_entropy(scores, labels)


def prepare(model, settings: TrainSettings):
    """The model to train: a peft LoRA wrapper, or the model itself with the embedding frozen."""
    if settings.kind == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0,
                            target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, config)
    if settings.kind != "full":
        raise ValueError(f"unknown fine-tune kind {settings.kind!r}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".layers." in name)
    return model


def fine_tune(model, tokenizer, task: PromptTask, settings: TrainSettings, progress: bool = True):
    """Train ``model`` in place on ``task`` (LoRA: returns the peft model); returns (model, stats)."""
    from tqdm.auto import tqdm

    torch.manual_seed(settings.seed)
    model = prepare(model, settings)
    device = next(model.parameters()).device
    examples = encode_examples(task, tokenizer, settings.steps * settings.batch_size)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(settings.seed)).tolist()
    steps = min(settings.steps, -(-len(examples) // settings.batch_size))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=settings.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(steps, settings.warmup_fraction))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    model.train()
    start, running = time.perf_counter(), None
    bar = tqdm(total=steps, desc=f"{settings.kind} {task.name}", unit="step", disable=not progress)
    for step in range(steps):
        chosen = order[step * settings.batch_size:(step + 1) * settings.batch_size]
        loss = ranking_loss(model, [examples[i] for i in chosen], pad_id, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.8 * running + 0.2 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        bar.update(1)
    bar.close()
    model.eval()
    stats = {"steps": steps, "examples": min(len(examples), steps * settings.batch_size), "final_loss": running,
             "trained_parameters": sum(p.numel() for p in trained), "train_seconds": time.perf_counter() - start}
    return model, stats
