"""A text as a prompt: a template with one ``{text}`` field, and the cut that fits it to a token budget.

Shared by the LLM track, which scores and fine-tunes on such prompts
(:mod:`primerge.evaluation.llm.prompts` adds label words, tasks and lm-eval's answer rule), and by
the calibration pass of a data-aware merge (``calibration: {template: ...}``), which runs the same
prompts through the models so their Gram matrices are those of the inputs the models are used on.

Token counts come from encoding whole prompts as lm-eval's HFLM does (``tokenizer.encode`` with the
tokenizer's own special-token default, so a BOS token counts where the tokenizer adds one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

TEXT_FIELD = "{text}"
TARGET_DELIMITER = " "


@dataclass(frozen=True)
class Verbaliser:
    """``template`` (with one ``{text}``) and one answer word per class, in class order (none for a
    template that only frames texts, as a calibration pass reads them)."""

    template: str
    words: tuple[str, ...] = ()

    def prompt(self, text: str) -> str:
        return self.template.replace(TEXT_FIELD, text)

    def answer(self, label: int) -> str:
        return TARGET_DELIMITER + self.words[label]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids as lm-eval's HFLM encodes a string (the tokenizer's own special-token default)."""
    return list(tokenizer.encode(text))


def prompt_length(tokenizer, verbaliser: Verbaliser, text: str) -> int:
    """Tokens of ``text``'s prompt as lm-eval encodes it (the BOS token included where the tokenizer
    adds one)."""
    return len(encode(tokenizer, verbaliser.prompt(text)))


def word_ends(text: str) -> list[int]:
    """Every ``i`` such that ``text[:i]`` ends a word: ``text[i]`` is whitespace, ``text[i - 1]`` is not."""
    return [i for i in range(1, len(text)) if text[i].isspace() and not text[i - 1].isspace()]


def longest_fitting(lengths: Sequence[int], fits) -> int:
    """Bisection for the last of the ascending ``lengths`` with ``fits(length)`` (0 when the first
    does not fit). Only a length that was tested and fits is returned; when ``fits`` is monotone
    (it is false after its first false) the result is the longest that fits."""
    lo, hi = -1, len(lengths)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(lengths[mid]) else (lo, mid)
    return lengths[lo] if lo >= 0 else 0


def fit_text(text: str, verbaliser: Verbaliser, tokenizer, max_prompt_tokens: int) -> str:
    """The longest prefix of ``text`` ending at a word end whose prompt has at most
    ``max_prompt_tokens`` tokens; when not even the first word fits, the longest prefix of the first
    word that does (a mid-word cut); ``""`` when not even its first character fits.

    Token counts come from encoding whole prompts (never from decoding ids back to text, which
    differs from the text wherever a tokenizer adds a BOS token, a space prefix or normalizes).
    A prompt's token count grows with its words (pre-tokenizers split at spaces; a word is at
    least one token), so bisection over the word ends finds the longest prefix with
    O(log words) encodings.
    """
    def fits(length: int) -> bool:
        return prompt_length(tokenizer, verbaliser, text[:length]) <= max_prompt_tokens

    if fits(len(text)):
        return text
    ends = word_ends(text)
    cut = longest_fitting(ends, fits)
    if not cut:
        first_word = range(1, ends[0] if ends else len(text))
        cut = longest_fitting([i for i in first_word if not text[i - 1].isspace()], fits)
    return text[:cut]
