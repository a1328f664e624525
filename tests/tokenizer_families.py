"""Small tokenizers of the real families' designs, trained locally (nothing is downloaded).

Each family is built the way its published ``tokenizer.json`` / ``tokenizer_config.json`` are:
the same model type, normalizer, pre-tokenizer, special tokens, BOS rule and transformers
tokenizer class, with a small vocabulary trained by the ``tokenizers`` BPE trainer on local text
(the packaged tasks' texts and the prompts' templates). The folder is then loaded the way primerge
loads a user's model (:func:`primerge.io.hf.load_tokenizer`: ``AutoTokenizer``), so the tokenizer
under test is the one transformers builds for that family's class, not the object written.

========== ===================== ======================== ===================== ==============
family     model                 pre-tokenization          BOS added             class
========== ===================== ======================== ===================== ==============
llama3     byte-level BPE        Llama-3 regex, no prefix  ``<|begin_of_text|>``  PreTrainedTokenizerFast
llama2     BPE + byte fallback   Metaspace, ``▁`` prefix   ``<s>``                LlamaTokenizer (legacy: false)
mistral    BPE + byte fallback   Metaspace, ``▁`` prefix   ``<s>``                LlamaTokenizer (legacy: true),
                                                                                  [INST] control tokens
qwen2      byte-level BPE        Qwen2 regex, NFC          none                  Qwen2Tokenizer
gpt2       byte-level BPE        GPT-2 regex               none                  GPT2Tokenizer
gemma      BPE + byte fallback   spaces as ``▁``, no       ``<bos>``              GemmaTokenizer
                                 prefix
========== ===================== ======================== ===================== ==============
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
VOCAB_SIZE = 1200
ALPHABET = 200


@dataclass(frozen=True)
class Family:
    """How one family's tokenizer is built: its special tokens (first ids), BOS, class and design."""

    name: str
    specials: tuple[str, ...]
    config: dict  # tokenizer_config.json (tokenizer_class, special tokens, add_bos_token, ...)
    byte_level: bool  # byte-level BPE (else SentencePiece-style BPE with byte fallback)
    design: Callable  # (tokenizers.Tokenizer) -> None: normalizer, pre-tokenizer, decoder
    bos: str | None = None  # the token the post-processor puts first, if any
    trainer_split: Callable | None = field(default=None)  # pre-tokenizer used only while training


def _byte_level(pattern: str | None, nfc: bool = False):
    def design(tok) -> None:
        from tokenizers import Regex, decoders, normalizers, pre_tokenizers

        if pattern is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.normalizer = normalizers.NFC() if nfc else None
        tok.decoder = decoders.ByteLevel()
    return design


def _metaspace(prepend: str):
    """SentencePiece-style: spaces become ``▁`` (and one is prepended to the text unless ``never``)."""
    def design(tok) -> None:
        from tokenizers import decoders, pre_tokenizers

        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prepend != "never" else []))
    return design


def _gemma_design(tok) -> None:
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])


def _words(prepend: str):
    """Training only: SentencePiece never merges across a ``▁`` boundary (split_by_whitespace)."""
    def split():
        from tokenizers import pre_tokenizers

        return pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=True)
    return split


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama3", ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
           {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": True},
           byte_level=True, design=_byte_level(LLAMA3_PATTERN), bos="<|begin_of_text|>"),
    Family("llama2", ("<unk>", "<s>", "</s>"),
           {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": False, "pad_token": None},
           byte_level=False, design=_metaspace("first"), bos="<s>", trainer_split=_words("always")),
    Family("mistral", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
           {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": True, "pad_token": None},
           byte_level=False, design=_metaspace("always"), bos="<s>", trainer_split=_words("always")),
    Family("qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
           {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace"},
           byte_level=True, design=_byte_level(QWEN2_PATTERN, nfc=True)),
    Family("gpt2", ("<|endoftext|>",),
           {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>"},
           byte_level=True, design=_byte_level(None)),
    Family("gemma", ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"),
           {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
            "pad_token": "<pad>", "mask_token": "<mask>", "add_bos_token": True, "add_eos_token": False},
           byte_level=False, design=_gemma_design, bos="<bos>", trainer_split=_words("never")),
)}


@functools.cache
def corpus() -> tuple[str, ...]:
    """Local training text: the packaged tasks' texts (news, reviews, tweets, debates) and the prompts."""
    from primerge.data.tasks import PACKAGED
    from primerge.evaluation.llm.prompts import PACKAGED_PROMPTS

    texts = [t for name, n in (("bbc_topic", 300), ("tweet_sentiment", 1500), ("debate_party", 600),
                               ("rt_sentiment", 1500)) for t in PACKAGED[name]().texts[:n]]
    prompts = [v.prompt(t) + v.answer(c) for v in PACKAGED_PROMPTS.values() for t, c in
               zip(texts[:40], range(40)) for c in [c % len(v.words)]]
    return tuple(texts + prompts)


def trained(family: Family):
    """The family's ``tokenizers.Tokenizer``: its design, a BPE vocabulary trained on :func:`corpus`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    unk = None if family.byte_level else "<unk>"
    tok = Tokenizer(models.BPE(unk_token=unk, fuse_unk=not family.byte_level, byte_fallback=not family.byte_level))
    family.design(tok)
    if family.trainer_split is not None:
        tok.pre_tokenizer = family.trainer_split()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if family.byte_level else []
    limit = {} if family.byte_level else {"limit_alphabet": ALPHABET}  # rarer characters: byte fallback
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(family.specials),
                                  initial_alphabet=alphabet, show_progress=False, **limit)
    tok.train_from_iterator(corpus(), trainer)
    if not family.byte_level:  # SentencePiece's byte fallback: <0x00> ... <0xFF> right after the specials
        tok = _with_byte_tokens(tok, family)
    family.design(tok)
    if family.bos is not None:
        bos = tok.token_to_id(family.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B:1", special_tokens=[(family.bos, bos)])
    elif family.byte_level:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _with_byte_tokens(tok, family: Family):
    from tokenizers import AddedToken, Tokenizer, models

    model = json.loads(tok.to_str())["model"]
    ordered = sorted(model["vocab"].items(), key=lambda item: item[1])
    specials = [t for t, _ in ordered[:len(family.specials)]]
    rest = [t for t, _ in ordered[len(family.specials):] if t not in BYTE_TOKENS]
    vocab = {t: i for i, t in enumerate(specials + BYTE_TOKENS + rest)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    rebuilt = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    rebuilt.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.specials])
    return rebuilt


def save_family_tokenizer(name: str, folder: Path) -> Path:
    """Write the family's tokenizer.json and tokenizer_config.json into ``folder``."""
    family = FAMILIES[name]
    folder.mkdir(parents=True, exist_ok=True)
    tok = trained(family)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**family.config, "model_max_length": 4096}))
    return folder


@functools.cache
def family_tokenizer(name: str):
    """The family's tokenizer as primerge loads a model folder's (AutoTokenizer, local files)."""
    from primerge.io.hf import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return load_tokenizer(save_family_tokenizer(name, Path(tmp)))
