"""Casting classification tasks as prompts, and the label-word checks."""

from __future__ import annotations

import pytest

from llm_fixtures import byte_level_tokenizer, tiny_llama
from primerge.util.errors import InputError
from primerge.evaluation.llm.prompts import (PACKAGED_PROMPTS, Verbaliser, cast_task, fit_text, label_tokens,
                                             options, split_answer, verbaliser_for)
from primerge.data.tasks import PACKAGED, TaskData

TEXTS = tuple(f"the pot {i} is on a nose at it and the other one is here too" for i in range(20))


def task_data(classes=("posit", "the"), name="toy") -> TaskData:
    return TaskData(name, classes, TEXTS, tuple(i % len(classes) for i in range(len(TEXTS))), "test")


def word_level_tokenizer():
    """A whitespace word-level tokenizer: every word outside its vocabulary becomes [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "Text:", "Is", "this", "x", "Answer:", "or", "yes", "no", "?"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_options_and_verbalisers():
    assert options(["a"]) == "a" and options(["a", "b"]) == "a or b" and options(["a", "b", "c"]) == "a, b or c"
    assert set(PACKAGED_PROMPTS) == set(PACKAGED)
    v = verbaliser_for(task_data(("rotten", "fresh"), name="rt_sentiment"))
    assert v.prompt("Fun.") == "Review: Fun.\nIs this review negative or positive?\nAnswer:" and v.answer(1) == " positive"
    user = verbaliser_for(task_data(("cat", "dog", "eel")))
    assert user.template == "Text: {text}\nIs this cat, dog or eel?\nAnswer:" and user.words == ("cat", "dog", "eel")


def test_answer_split_is_lm_evals():
    """Our (prompt ids, answer ids) equal lm-eval's HFLM._encode_pair, including a trailing space."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    tokenizer = byte_level_tokenizer()
    lm = HFLM(pretrained=tiny_llama(), tokenizer=tokenizer, batch_size=1)
    for prompt, answer in (("Text: the pot\nAnswer:", " posit"), ("Text: a nose \nAnswer: ", "negative"),
                           ("on", " the pot")):
        assert split_answer(tokenizer, prompt, answer) == tuple(map(list, lm._encode_pair(prompt, answer)))


def test_label_tokens_single_and_multi_token():
    tokenizer = byte_level_tokenizer()
    ids = label_tokens("toy", Verbaliser("Text: {text}\nAnswer:", ("posit", "negative")), tokenizer, ("a", "b"))
    assert ids[0] == (tokenizer.convert_tokens_to_ids("Ġposit"),)
    assert len(ids[1]) > 1 and tokenizer.decode(list(ids[1])) == " negative"
    task = cast_task(task_data().split(), tokenizer, 40, 4, 4, Verbaliser("Text: {text}\nAnswer:", ("posit", "negative")))
    assert task.describe_labels().startswith("'posit' (1 token), 'negative' (") and "tokens)" in task.describe_labels()


def test_colliding_label_words_are_refused():
    with pytest.raises(InputError, match=r"classes 'a' and 'b' both verbalise to token ids .* \(label word 'yes'\)"):
        label_tokens("toy", Verbaliser("Text: {text}\nAnswer:", ("yes", "yes")), byte_level_tokenizer(), ("a", "b"))
    # distinct words that this tokenizer cannot tell apart: both become [UNK]
    with pytest.raises(InputError, match=r"task 'toy': classes 'cat' and 'dog' both verbalise to token ids \[0\]"):
        label_tokens("toy", verbaliser_for(task_data(("cat", "dog"))), word_level_tokenizer(), ("cat", "dog"))
    assert label_tokens("toy", Verbaliser("Text: {text} Answer:", ("yes", "no")), word_level_tokenizer(),
                        ("a", "b")) == ((7,), (8,))


def test_empty_and_mismatched_label_words_are_refused():
    with pytest.raises(InputError, match="class 'b' has an empty label word"):
        label_tokens("toy", Verbaliser("{text}:", ("yes", " ")), byte_level_tokenizer(), ("a", "b"))
    with pytest.raises(InputError, match="3 label words for 2 classes"):
        label_tokens("toy", Verbaliser("{text}:", ("a", "b", "c")), byte_level_tokenizer(), ("a", "b"))


def test_fit_text_cuts_at_word_boundaries_within_the_budget():
    tokenizer = byte_level_tokenizer()
    v = Verbaliser("Text: {text}\nAnswer:", ("posit", "the"))
    text = TEXTS[3]
    for budget in (16, 24, 40):
        cut = fit_text(text, v, tokenizer, budget)
        assert len(tokenizer.encode(v.prompt(cut))) <= budget and text.startswith(cut) and cut
        assert cut == text or text[len(cut)] == " "
    assert fit_text("on it", v, tokenizer, 200) == "on it"


def test_cast_task_sizes_labels_and_fingerprint():
    tokenizer = byte_level_tokenizer()
    split = task_data().split()
    task = cast_task(split, tokenizer, 30, 5, 3)
    assert (len(task.train_prompts), len(task.test_prompts)) == (5, 3)
    assert task.train_labels == split.train_labels[:5] and task.test_labels == split.test_labels[:3]
    assert all(len(tokenizer.encode(p)) <= 30 for p in task.train_prompts + task.test_prompts)
    other = cast_task(split, tokenizer, 30, 5, 3, Verbaliser(task.verbaliser.template, ("the", "posit")))
    assert other.fingerprint() != task.fingerprint() and cast_task(split, tokenizer, 30, 5, 3).fingerprint() == task.fingerprint()
    with pytest.raises(InputError, match="leaving fewer than 4 of 12 for the text"):
        cast_task(split, tokenizer, 12, 5, 3)
    with pytest.raises(InputError, match="has no {text} field"):
        cast_task(split, tokenizer, 30, 5, 3, Verbaliser("no field", ("a", "b")))
