"""A model folder's tokenizer vocabulary, read from ``tokenizer.json`` with the ``tokenizers`` library.

Only local files are read. :func:`read_vocabulary` gives every token string with its id (added
tokens included) and the added tokens' properties; :func:`extended_tokenizer` writes the base's
``tokenizer.json`` with more added tokens (the ids the library assigns are the ones the merge
uses, so the written tokenizer and the merged rows agree by construction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from primerge.util.errors import InputError

TOKENIZER_FILE = "tokenizer.json"
#: properties of an added token kept when it is copied into another tokenizer
ADDED_FIELDS = ("special", "single_word", "lstrip", "rstrip", "normalized")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError("aligning vocabularies needs the tokenizers library: pip install 'primerge[hf]'") from None
    return tokenizers


@dataclass(frozen=True)
class Vocabulary:
    """The vocabulary of one tokenizer: ``tokens`` maps each token string to its id; ``added``
    maps added tokens to their properties (:data:`ADDED_FIELDS`)."""

    file: Path
    tokens: dict[str, int]
    added: dict[str, dict[str, bool]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def next_id(self) -> int:
        """One past the largest id."""
        return max(self.tokens.values(), default=-1) + 1


def _load(file: Path):
    try:
        return _tokenizers().Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust library raises its own exception type for bad files
        raise InputError(f"{file}: cannot read the tokenizer ({exc}). Re-save it with "
                         f"AutoTokenizer.from_pretrained(...).save_pretrained(...).") from None


def read_vocabulary(folder: Path | None) -> Vocabulary | None:
    """The vocabulary of ``folder/tokenizer.json``, or ``None`` when there is no such file."""
    if folder is None or not (folder / TOKENIZER_FILE).is_file():
        return None
    file = folder / TOKENIZER_FILE
    tokenizer = _load(file)
    added = {t.content: {f: bool(getattr(t, f)) for f in ADDED_FIELDS}
             for t in tokenizer.get_added_tokens_decoder().values()}
    return Vocabulary(file, dict(tokenizer.get_vocab(with_added_tokens=True)), added)


def extended_tokenizer(file: Path, tokens: list[tuple[str, dict[str, bool]]]) -> tuple[str, dict[str, int]]:
    """``file``'s tokenizer with ``tokens`` (string, properties) added in order: its JSON text and
    the id of every added token."""
    tokenizers = _tokenizers()
    tokenizer = _load(file)
    for content, props in tokens:
        tokenizer.add_tokens([tokenizers.AddedToken(content, **props)])
    ids = {content: tokenizer.token_to_id(content) for content, _ in tokens}
    return tokenizer.to_str(pretty=True), ids
