"""Fine-tuning a causal LM on a cast task, both ways: LoRA adapters and full fine-tunes.

The loss is the language-modelling loss on the answer tokens only: for a prompt x and the answer
tokens y_1..y_k of its class, L = -(1/N) Σ_examples Σ_j log p(y_j | x, y_<j) over the full
vocabulary (N = answer tokens in the batch). Logits are computed at the answer positions only:
sequences are left-padded so every answer ends at the last position, and the model is called with
``logits_to_keep = k_max`` (the longest answer in the batch); position ids count real tokens, so
padding changes nothing. The 49152-row output head, a fifth of SmolLM2's forward cost per position,
runs on k_max positions per sequence instead of all ~30.

- **LoRA**: peft ``LoraConfig(r, lora_alpha = 2r, dropout 0)`` on every linear layer of the
  decoder (q, k, v, o, gate, up, down); only the adapters train.
- **Full**: every decoder-layer weight and norm trains; the token embedding (tied to the output
  head: 28M of SmolLM2's 134.5M parameters) stays frozen. Merging methods treat the embedding as a
  non-matrix tensor (averaged), and freezing it saves its AdamW state and update; that it is what
  fits the CPU budget is stated in the README.

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


def encode_examples(task: PromptTask, tokenizer, count: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of the first ``count`` training examples."""
    return [split_answer(tokenizer, prompt, task.verbaliser.answer(label))
            for prompt, label in zip(task.train_prompts[:count], task.train_labels[:count])]


def left_padded(examples: Sequence[tuple[list[int], list[int]]], pad_id: int, device) -> dict:
    """Batch tensors with every sequence right-aligned: input ids, attention mask, position ids
    (0 at each sequence's first real token), and the answer targets aligned to the last k_max
    logits (-100 where a shorter answer leaves no target)."""
    length = max(len(p) + len(a) for p, a in examples)
    k_max = max(len(a) for _, a in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    targets = torch.full((len(examples), k_max), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(examples):
        sequence = prompt + answer
        ids[row, length - len(sequence):] = torch.tensor(sequence)
        mask[row, length - len(sequence):] = 1
        targets[row, k_max - len(answer):] = torch.tensor(answer)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # logits at position t predict token t + 1: the answer's k tokens are predicted by the k
    # positions ending one before the last, so the model input drops the final token.
    batch = {"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1], "position_ids": positions[:, :-1]}
    return {**{k: v.to(device) for k, v in batch.items()}, "targets": targets.to(device), "k_max": k_max}


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens, from logits at the last k_max positions only."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=batch["k_max"]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["targets"].reshape(-1),
                                       ignore_index=-100)


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
        loss = answer_loss(model, left_padded([examples[i] for i in chosen], pad_id, device))
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
