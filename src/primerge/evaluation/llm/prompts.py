"""Classification tasks cast as prompts for a causal LM, with verbalised labels.

A :class:`Verbaliser` turns an example into a prompt (``template`` with ``{text}``) and class ``i``
into the answer ``" " + words[i]`` (lm-eval's default target delimiter is one space). The model's
prediction is the class whose answer has the highest log-likelihood after the prompt.

Tokenization follows lm-eval's rule for causal models exactly: the answer's tokens are
``encode(prompt + answer)[len(encode(prompt)):]``, so training and evaluation see the same ids.

Label words are checked against the tokenizer (:func:`label_tokens`):

- two classes whose answers are the same token sequence (equal words, or words a tokenizer maps to
  the same ids, e.g. both unknown) cannot be told apart: refused;
- an answer with no token of its own (it merges into the prompt's last token) is refused;
- an answer of several tokens is scored as the sum of its tokens' log-probabilities (lm-eval's
  ``acc``), and trained on every one of its tokens. It is allowed, but costs the harness one
  forward per class instead of one per example (the one-token continuation cache no longer
  applies), so the packaged tasks use single-token words.

Texts are cut at a word boundary so that a whole prompt is at most ``max_prompt_tokens`` tokens
(:func:`~primerge.data.prompts.fit_text`, which the calibration pass of RegMean shares); a text that would be cut to nothing is an error naming the example and the
option that raises the budget, never a blank prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from primerge.util.errors import InputError
from primerge.data.prompts import TARGET_DELIMITER, TEXT_FIELD, Verbaliser, encode, fit_text, prompt_length
from primerge.data.tasks import TaskData, TaskSplit

MIN_TEXT_TOKENS = 4
#: The option that sets ``max_prompt_tokens`` on every command that casts prompts (eval, demo, tune).
BUDGET_OPTION = "--max-prompt-tokens"


def options(words: Sequence[str]) -> str:
    """'a or b', 'a, b or c'."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def question(field: str, ask: str, words: Sequence[str]) -> Verbaliser:
    """``"<field>: {text}\\n<ask> <options>?\\nAnswer:"`` answered by one of ``words``."""
    return Verbaliser(f"{field}: {TEXT_FIELD}\n{ask} {options(words)}?\nAnswer:", tuple(words))


#: Prompts of the packaged tasks (classes in the task's order). Every word is one SmolLM2 token.
PACKAGED_PROMPTS: dict[str, Verbaliser] = {
    "rt_sentiment": question("Review", "Is this review", ("negative", "positive")),
    "subjectivity": question("Sentence", "Is this sentence a", ("plot", "opinion")),
    "bbc_topic": question("Article", "Topic:", ("business", "entertainment", "politics", "sports", "tech")),
    "tweet_sentiment": question("Tweet", "Is this tweet", ("negative", "neutral", "positive")),
    "party": question("Speech", "Is the speaker a", ("Republican", "Democrat")),
    "debate_party": question("Debate", "Is the speaker a", ("Republican", "Democrat", "moderator")),
}


def verbaliser_for(task: TaskData | TaskSplit) -> Verbaliser:
    """The packaged prompt of a packaged task; for a user task, ``Text: ...`` answered by the class
    names themselves."""
    if task.name in PACKAGED_PROMPTS and len(PACKAGED_PROMPTS[task.name].words) == len(task.classes):
        return PACKAGED_PROMPTS[task.name]
    return question("Text", "Is this", tuple(task.classes))


def split_answer(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) by lm-eval's causal rule: answer = encode(prompt + answer) minus the
    first len(encode(prompt)) ids (trailing spaces of the prompt move to the answer)."""
    spaces = len(prompt) - len(prompt.rstrip())
    if spaces:
        prompt, answer = prompt[:-spaces], prompt[-spaces:] + answer
    context = encode(tokenizer, prompt)
    return context, encode(tokenizer, prompt + answer)[len(context):]


def label_tokens(task: str, verbaliser: Verbaliser, tokenizer, classes: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The answer ids of every class after the task's prompt; refuses answers that collide or that
    have no token of their own (see the module docstring)."""
    if len(verbaliser.words) != len(classes):
        raise InputError(f"task '{task}': {len(verbaliser.words)} label words for {len(classes)} classes.")
    prompt = verbaliser.prompt("x")
    ids = []
    for cls, word in zip(classes, verbaliser.words):
        if not word.strip():
            raise InputError(f"task '{task}': class {cls!r} has an empty label word; give it a word.")
        answer = split_answer(tokenizer, prompt, TARGET_DELIMITER + word)[1]
        if not answer:
            raise InputError(f"task '{task}': the label word {word!r} of class {cls!r} has no token of its own "
                             "after the prompt; choose another word.")
        ids.append(tuple(answer))
    seen: dict[tuple[int, ...], str] = {}
    for cls, word, answer in zip(classes, verbaliser.words, ids):
        if answer in seen:
            raise InputError(
                f"task '{task}': classes {seen[answer]!r} and {cls!r} both verbalise to token ids {list(answer)} "
                f"(label word {word!r}), so the model cannot tell them apart; give them distinct label words.")
        seen[answer] = cls
    return tuple(ids)


@dataclass(frozen=True)
class PromptTask:
    """A task cast as prompts: what the fine-tunes train on and what lm-eval scores."""

    name: str
    classes: tuple[str, ...]
    verbaliser: Verbaliser
    answer_ids: tuple[tuple[int, ...], ...]
    train_prompts: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_prompts: tuple[str, ...]
    test_labels: tuple[int, ...]

    @property
    def words(self) -> tuple[str, ...]:
        return self.verbaliser.words

    def fingerprint(self) -> str:
        """SHA-256 of the name, label words and every prompt and label of both splits."""
        digest = hashlib.sha256()
        for part in (self.name, *self.classes, self.verbaliser.template, *self.words):
            digest.update(part.encode() + b"\x00")
        for prompts, labels in ((self.train_prompts, self.train_labels), (self.test_prompts, self.test_labels)):
            digest.update(b"\x01")
            for prompt, label in zip(prompts, labels):
                digest.update(f"{label}\x00{prompt}\x00".encode())
        return digest.hexdigest()

    def describe_labels(self) -> str:
        """'negative' (1 token), 'positive' (1 token)."""
        return ", ".join(f"{w!r} ({len(ids)} token{'s' * (len(ids) > 1)})" for w, ids in zip(self.words, self.answer_ids))


def scored_examples(task: PromptTask, split: TaskSplit) -> str:
    """'the first 100 of the 1000 test examples (<how the split was made>)'."""
    used, total = len(task.test_prompts), len(split.test_texts)
    which = f"all {total}" if used == total else f"the first {used} of the {total}"
    return f"{which} test examples ({split.origin})"


def cast_task(split: TaskSplit, tokenizer, max_prompt_tokens: int, train_size: int, test_size: int,
              verbaliser: Verbaliser | None = None, test_part: str = "test") -> PromptTask:
    """Cast the first ``train_size`` training and ``test_size`` test examples of ``split`` (already
    shuffled with the split seed) as prompts of at most ``max_prompt_tokens`` tokens; ``test_part``
    names the test slot's examples in errors (the tuner puts validation examples there)."""
    verbaliser = verbaliser or verbaliser_for(split)
    if TEXT_FIELD not in verbaliser.template:
        raise InputError(f"task '{split.name}': the prompt template has no {TEXT_FIELD} field.")
    overhead = prompt_length(tokenizer, verbaliser, "")
    if max_prompt_tokens - overhead < MIN_TEXT_TOKENS:
        raise InputError(f"task '{split.name}': the prompt template alone is {overhead} tokens, leaving fewer than "
                         f"{MIN_TEXT_TOKENS} of {max_prompt_tokens} for the text; raise {BUDGET_OPTION}.")
    answer_ids = label_tokens(split.name, verbaliser, tokenizer, split.classes)

    def prompts(texts: Sequence[str], part: str) -> tuple[str, ...]:
        return tuple(verbaliser.prompt(fitted_text(split.name, part, i, text, verbaliser, tokenizer,
                                                   max_prompt_tokens)) for i, text in enumerate(texts))

    return PromptTask(
        name=split.name, classes=tuple(split.classes), verbaliser=verbaliser, answer_ids=answer_ids,
        train_prompts=prompts(split.train_texts[:train_size], "training"),
        train_labels=tuple(split.train_labels[:train_size]),
        test_prompts=prompts(split.test_texts[:test_size], test_part), test_labels=tuple(split.test_labels[:test_size]),
    )


def fitted_text(task: str, part: str, index: int, text: str, verbaliser: Verbaliser, tokenizer,
                max_prompt_tokens: int) -> str:
    """:func:`fit_text`, refusing a text it would empty (a blank prompt scores the template, not the text)."""
    cut = fit_text(text, verbaliser, tokenizer, max_prompt_tokens)
    if text.strip() and not cut:
        raise InputError(f"task '{task}': {part} example {index} ({text[:40]!r}) does not fit in a prompt of "
                         f"{max_prompt_tokens} tokens even cut to its first character; raise {BUDGET_OPTION}.")
    return cut


def prompt_calibration(tasks: Mapping[str, PromptTask], max_prompt_tokens: int) -> dict:
    """The settings of a ``calibration:`` block that runs each model's training texts as the prompts
    the LLM track fine-tunes on and scores: its task's template (``tasks``: model label -> cast task)
    and the prompt budget, so each text is cut as :func:`cast_task`
    cuts it. The LLM suite of the tuner (:mod:`primerge.tuning.llm_suite`) gives it as its ``calibration``.

    [decision] An LLM calibrates on its prompts, not on raw texts: RegMean fits each layer's outputs
    on the inputs X_t the layer sees in use (RegMean Section 3), and every scored prediction is read
    at the prompt's last token, after the template's question and ``Answer:``, whose activations raw
    texts never produce. The answer word is left out: lm-eval reads the prediction before it."""
    return {"template": {label: t.verbaliser.template for label, t in tasks.items()}, "max_length": max_prompt_tokens}
