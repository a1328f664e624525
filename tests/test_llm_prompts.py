"""Casting classification tasks as prompts, and the label-word checks."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_fixtures import byte_level_tokenizer, tiny_llama
from tokenizer_families import FAMILIES, family_tokenizer
from primerge.util.errors import InputError
from primerge.data.prompts import word_ends
from primerge.evaluation.llm.prompts import (MIN_TEXT_TOKENS, PACKAGED_PROMPTS, Verbaliser, cast_task, fit_text,
                                             fitted_text, label_tokens, options, prompt_length, split_answer,
                                             verbaliser_for)
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
    with pytest.raises(InputError, match="leaving fewer than 4 of 12 for the text; raise --max-prompt-tokens"):
        cast_task(split, tokenizer, 12, 5, 3)
    with pytest.raises(InputError, match="has no {text} field"):
        cast_task(split, tokenizer, 30, 5, 3, Verbaliser("no field", ("a", "b")))


# --- every tokenizer family -------------------------------------------------------------------------

#: Words of several scripts, digits, punctuation, accents, CJK and emoji (4 UTF-8 bytes: 4 byte tokens),
#: and the families' special tokens and the template's field written in a text.
WORD = st.one_of(st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789.,!?'’-:éüßçñ中文字日本ой🤖😀"),
                         min_size=1, max_size=12),
                 st.sampled_from(["<s>", "</s>", "<bos>", "<|endoftext|>", "<|begin_of_text|>", "[INST]", "{text}"]))
SPACE = st.sampled_from([" ", " ", " ", "  ", "\n", "\t", " \n"])
TEXT = st.tuples(st.sampled_from(["", " "]), st.lists(st.tuples(WORD, SPACE), min_size=1, max_size=60)).map(
    lambda parts: parts[0] + "".join(w + s for w, s in parts[1]).rstrip())
VERBALISERS = [PACKAGED_PROMPTS["rt_sentiment"], PACKAGED_PROMPTS["bbc_topic"],
               verbaliser_for(task_data(("0", "1", "unsure")))]


def assert_fitted(text: str, cut: str, verbaliser: Verbaliser, tokenizer, budget: int) -> None:
    """The fitted text of a prompt with at most ``budget`` tokens (see test_fit_text_on_every_family)."""
    assert prompt_length(tokenizer, verbaliser, cut) <= budget
    assert text.startswith(cut)
    ends = word_ends(text)
    if cut == text:
        return
    first_end = ends[0] if ends else len(text)
    if len(cut) in ends:  # a whole-word prefix, and the longest: the next word end does not fit
        later = [e for e in ends if e > len(cut)]
        assert prompt_length(tokenizer, verbaliser, text[:later[0] if later else len(text)]) > budget
    else:  # a mid-word cut only when the first word alone does not fit
        assert len(cut) < first_end and prompt_length(tokenizer, verbaliser, text[:first_end]) > budget
    first_character = len(text) - len(text.lstrip()) + 1
    assert cut or prompt_length(tokenizer, verbaliser, text[:first_character]) > budget


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT, which=st.integers(0, len(VERBALISERS) - 1), room=st.integers(1, 48))
def test_fit_text_on_every_family(family, text, which, room):
    """On the six families' tokenizers, for any text and any budget that the template fits: the fitted
    text is a prefix of the text ending at a word end (mid-word only when the first word alone is too
    long), the longest such prefix (the next word end overflows), non-empty whenever its first
    character fits, and its prompt is within the budget; every class's answer tokens after the fitted
    prompt are the ones :func:`label_tokens` checked (lm-eval's causal split)."""
    tokenizer, verbaliser = family_tokenizer(family), VERBALISERS[which]
    budget = prompt_length(tokenizer, verbaliser, "") + room
    cut = fit_text(text, verbaliser, tokenizer, budget)
    assert_fitted(text, cut, verbaliser, tokenizer, budget)
    answers = label_tokens("t", verbaliser, tokenizer, verbaliser.words)
    for c, ids in enumerate(answers):
        assert tuple(split_answer(tokenizer, verbaliser.prompt(cut), verbaliser.answer(c))[1]) == ids


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_long_real_texts_keep_their_words_on_every_family(family):
    """News articles cut to the CPU preset's budget and to a larger one: every prompt keeps text (the
    bug this guards against emptied every long text under a tokenizer that adds a BOS token)."""
    from primerge.data.tasks import PACKAGED

    tokenizer = family_tokenizer(family)
    split = PACKAGED["bbc_topic"]().split()
    verbaliser = verbaliser_for(split)
    for budget in (prompt_length(tokenizer, verbaliser, "") + MIN_TEXT_TOKENS, 96):
        task = cast_task(split, tokenizer, budget, 10, 30)
        for text, prompt in zip(split.test_texts, task.test_prompts):
            cut = prompt[len("Article: "):prompt.index("\nTopic:")]
            assert len(text) > len(cut) > 0
            assert_fitted(text, cut, verbaliser, tokenizer, budget)


@pytest.mark.parametrize("family", ["llama2", "gemma", "llama3"])
def test_a_text_that_would_be_emptied_is_an_error(family):
    """A text whose first character alone overflows the budget (a mathematical letter, 4 UTF-8 bytes
    in no trained vocabulary: byte tokens) is refused, naming the example and the option that raises
    the budget, never scored as a blank prompt; one token more and it is cut to that character."""
    tokenizer = family_tokenizer(family)
    verbaliser = verbaliser_for(task_data())
    wide = "𝔘𝔫𝔦 and more"
    needed = prompt_length(tokenizer, verbaliser, wide[:1])
    assert needed - prompt_length(tokenizer, verbaliser, "") >= 3  # several byte tokens
    with pytest.raises(InputError, match=rf"^task 'toy': test example 7 \('{wide}'\) does not fit in a prompt of "
                                         rf"{needed - 1} tokens even cut to its first character; raise "
                                         rf"--max-prompt-tokens\.$"):
        fitted_text("toy", "test", 7, wide, verbaliser, tokenizer, needed - 1)
    assert fitted_text("toy", "test", 7, wide, verbaliser, tokenizer, needed) == wide[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_answer_split_is_lm_evals_on_every_family(family):
    """(prompt ids, answer ids) equal lm-eval's HFLM._encode_pair under every family's tokenizer."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    tokenizer = family_tokenizer(family)
    lm = HFLM(pretrained=tiny_llama(vocab_size=len(tokenizer)), tokenizer=tokenizer, batch_size=1)
    verbaliser = PACKAGED_PROMPTS["rt_sentiment"]
    for prompt in (verbaliser.prompt("A three-hour cinema master class."), verbaliser.prompt("中文 ok 😀"),
                   "Review: x \nAnswer: "):
        for c in range(2):
            assert split_answer(tokenizer, prompt, verbaliser.answer(c)) == \
                tuple(map(list, lm._encode_pair(prompt, verbaliser.answer(c))))
