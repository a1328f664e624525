"""A model folder's tokenizer vocabulary, read from ``tokenizer.json`` with the ``tokenizers`` library.

Only local files are read, through the bounded reader (:func:`primerge.io.files.read_bounded`).
:func:`read_vocabulary` gives every token string with its id (added tokens included) and the added
tokens' properties, after checking that the file says one thing: no key twice in any JSON object
(a duplicated token in ``model.vocab`` would silently lose one of its ids), no id given to two
token strings, and the library's vocabulary exactly the entries the file lists (so every row the
alignment reads belongs to the token the file names). :func:`extended_tokenizer` writes the base's
``tokenizer.json`` with more added tokens (the ids the library assigns are the ones the merge
uses, so the written tokenizer and the merged rows agree by construction); a token the library
cannot add (e.g. the empty string) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from primerge.util.errors import InputError, quoted
from primerge.io.files import kind, parse_json, read_bounded

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
    """The tokenizer of ``file`` (read within bounds) and its JSON as the file states it."""
    try:
        text = read_bounded(file, "tokenizer", "tokenizer").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{file}: the tokenizer is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         f"re-save it.") from None
    data = parse_json(text, file, "tokenizer", object_pairs_hook=lambda pairs: _unique_keys(file, pairs))
    try:
        return _tokenizers().Tokenizer.from_str(text), data
    except Exception as exc:  # the Rust library raises its own exception type for bad files
        raise InputError(f"{file}: cannot read the tokenizer ({str(exc)[:200]}). Re-save it with "
                         f"AutoTokenizer.from_pretrained(...).save_pretrained(...).") from None


def _unique_keys(file: Path, pairs: list[tuple[str, object]]) -> dict:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise InputError(f"{file}: the key {quoted(twice)} appears twice in one object, so one of its values "
                         f"would be silently dropped; repair or re-save the tokenizer.")
    return found


def stated_ids(data: object) -> dict[str, int]:
    """Token -> id as ``tokenizer.json`` states it: ``model.vocab`` (an object, or a list whose
    positions are the ids) and ``added_tokens``; ``{}`` for a layout this does not know."""
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        stated = dict(vocab)
    elif isinstance(vocab, list):
        stated = {entry[0]: i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry}
    else:
        return {}
    for token in data.get("added_tokens") or []:
        if isinstance(token, dict) and "content" in token:
            stated.setdefault(token["content"], token.get("id"))
    return stated


def _check_agrees(file: Path, tokens: dict[str, int], stated: dict[str, int]) -> None:
    """Refuse a vocabulary where two tokens share an id, or the library's vocabulary is not the
    one the file states (a token lost or moved)."""
    owners: dict[int, str] = {}
    for token, i in tokens.items():
        other = owners.setdefault(i, token)
        if other != token:
            raise InputError(f"{file}: tokens {quoted(other)} and {quoted(token)} both have id {i}, so one row "
                             f"would be read for two tokens; repair or re-save the tokenizer.")
    if stated and stated != tokens:
        token = next(t for t in {**stated, **tokens} if stated.get(t) != tokens.get(t))
        raise InputError(f"{file}: the file gives token {quoted(token)} the id {stated.get(token)}, but the "
                         f"tokenizer it builds gives it {tokens.get(token)}; the file contradicts itself. Repair "
                         f"or re-save the tokenizer.")


def read_vocabulary(folder: Path | None) -> Vocabulary | None:
    """The vocabulary of ``folder/tokenizer.json`` (checked, see the module docstring), or ``None``
    when there is no such file."""
    if folder is None or kind(folder / TOKENIZER_FILE) is None:
        return None
    file = folder / TOKENIZER_FILE
    tokenizer, data = _load(file)
    added = {t.content: {f: bool(getattr(t, f)) for f in ADDED_FIELDS}
             for t in tokenizer.get_added_tokens_decoder().values()}
    tokens = dict(tokenizer.get_vocab(with_added_tokens=True))
    _check_agrees(file, tokens, stated_ids(data))
    return Vocabulary(file, tokens, added)


def extended_tokenizer(file: Path, tokens: list[tuple[str, dict[str, bool]]],
                       sources: dict[str, Path] | None = None) -> tuple[str, dict[str, int]]:
    """``file``'s tokenizer with ``tokens`` (string, properties) added in order: its JSON text and
    the id of every added token. A token the library does not add is refused, naming the tokenizer
    it came from (``sources``: token -> file)."""
    tokenizers = _tokenizers()
    tokenizer, _ = _load(file)
    for content, props in tokens:
        tokenizer.add_tokens([tokenizers.AddedToken(content, **props)])
    ids = {content: tokenizer.token_to_id(content) for content, _ in tokens}
    lost = next((content for content, i in ids.items() if i is None), None)
    if lost is not None:
        origin = (sources or {}).get(lost, "a model's tokenizer")
        raise InputError(f"{origin}: token {quoted(lost)} cannot be added to the base's tokenizer {file} (the "
                         f"tokenizers library refuses it), so tokenizer: union cannot give it a row. Remove it "
                         f"from that tokenizer, or merge with tokenizer: base.")
    return tokenizer.to_str(pretty=True), ids
