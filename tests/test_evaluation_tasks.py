"""Tasks, splits, CSV/JSONL loading, metric math and cache keys (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from primerge.util.errors import InputError
from primerge.evaluation.evaluate import Scores, accuracy, average, normalized_accuracy, pad_batch
from primerge.data.tasks import TaskData, TaskSplit, deduplicate, load_splits, load_table, load_task
from primerge.evaluation.zoo import TrainingProtocol, batches_per_epoch, bucketed_batches, task_key, warmup_linear
from primerge.util.cache_dirs import cache_root


def make_task(n: int, classes=("a", "b"), name="t") -> TaskData:
    texts = tuple(f"example number {i}" for i in range(n))
    labels = tuple(i % len(classes) for i in range(n))
    return TaskData(name, tuple(classes), texts, labels, "memory")


# ------------------------------------------------------------------ splits


@pytest.mark.parametrize(
    ("n", "test", "train"),
    [(10, 4, 6), (50, 20, 30), (2000, 800, 1200), (3000, 1000, 1500), (10_000, 1000, 1500), (1122, 448, 674)],
)
def test_split_sizes_follow_the_benchmark_rule(n, test, train):
    split = make_task(n).split()
    assert (len(split.test_texts), len(split.train_texts)) == (test, train)
    assert len(split.test_labels) == test and len(split.train_labels) == train


def test_split_is_deterministic_and_depends_on_the_seed():
    task = make_task(500)
    first, second = task.split(), task.split()
    assert first == second
    assert first.fingerprint() == second.fingerprint()
    other = task.split(seed=1)
    assert other.test_texts != first.test_texts
    assert other.fingerprint() != first.fingerprint()


def test_split_keeps_text_label_pairs():
    split = make_task(300).split()
    for text, label in zip(split.train_texts + split.test_texts, split.train_labels + split.test_labels):
        assert label == int(text.split()[-1]) % 2


def test_train_and_test_are_disjoint_even_with_duplicate_texts():
    texts = tuple(f"text {i % 40}" for i in range(200))  # every text five times
    task = TaskData("dup", ("a", "b"), texts, tuple(i % 2 for i in range(200)), "memory")
    split = task.split()
    assert not set(split.train_texts) & set(split.test_texts)
    assert len(split.train_texts) + len(split.test_texts) == 40
    assert len(set(split.train_texts)) == len(split.train_texts)


def test_deduplicate_keeps_first_occurrence():
    assert deduplicate(["x", "y", "x", "z"], [0, 1, 1, 0]) == (["x", "y", "z"], [0, 1, 0])


def test_too_small_task_is_an_input_error():
    with pytest.raises(InputError, match="too few"):
        make_task(2).split()


def test_fingerprint_changes_with_a_label():
    split = make_task(40).split()
    flipped = TaskSplit(split.name, split.classes, split.train_texts,
                        (1 - split.train_labels[0],) + split.train_labels[1:], split.test_texts, split.test_labels)
    assert flipped.fingerprint() != split.fingerprint()


# ------------------------------------------------------------------ CSV / JSONL


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_task_loads_with_sorted_classes(tmp_path):
    path = write(tmp_path / "reviews.csv", 'text,label\n"good, very good",pos\nbad movie,neg\nfine  film,pos\n')
    task = load_table(path)
    assert task.name == "reviews"
    assert task.classes == ("neg", "pos")
    assert task.texts == ("good, very good", "bad movie", "fine film")
    assert task.labels == (1, 0, 1)


def test_integer_labels_sort_numerically(tmp_path):
    lines = "\n".join(json.dumps({"text": f"t{i}", "label": lab}) for i, lab in enumerate([10, 2, 1, 2]))
    task = load_table(write(tmp_path / "n.jsonl", lines + "\n"))
    assert task.classes == ("1", "2", "10")
    assert task.labels == (2, 1, 0, 1)


def test_jsonl_skips_blank_lines_and_keeps_extra_fields(tmp_path):
    path = write(tmp_path / "j.jsonl", '{"text": "a b", "label": "x", "id": 1}\n\n{"text": "c", "label": "y"}\n')
    task = load_table(path)
    assert task.texts == ("a b", "c") and task.labels == (0, 1)


@pytest.mark.parametrize("name,content,message", [
    ("bad.csv", "text,category\nhello,a\n", r"bad\.csv has no 'label' column.*'category'"),
    ("bad.csv", "text,label\nhello,a\n  ,b\nbye,b\n", r"bad\.csv, row 3: has an empty text"),
    ("bad.csv", "text,label\nhello,a\nbye,\n", r"bad\.csv, row 3: has an empty label"),
    ("bad.csv", "text,label\nhello,a,extra\n", r"bad\.csv, row 2: has more fields"),
    ("bad.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": \n', r"bad\.jsonl, row 2: is not valid JSON"),
])
def test_bad_table_names_the_file_row_and_problem(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(InputError, match=message):
        load_table(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "b"}', "has no 'label' field"),
        ('{"label": 1}', "has no 'text' field"),
        ('{"text": 5, "label": 1}', "text 5 is not a string"),
        ('{"text": "b", "label": null}', "label None is not a class name"),
        ('{"text": "b", "label": 1.5}', "label 1.5 is not a class name"),
        ('["b", 1]', "is not a JSON object"),
    ],
)
def test_jsonl_bad_rows(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", '{"text": "a", "label": 0}\n' + line + "\n")
    with pytest.raises(InputError, match=rf"bad\.jsonl, row 2: {message}"):
        load_table(path)


def test_unknown_label_against_known_classes(tmp_path):
    path = write(tmp_path / "test.csv", "text,label\na,pos\nb,neutral\n")
    with pytest.raises(InputError, match=r"test\.csv, row 3: unknown label 'neutral'.*\['neg', 'pos'\]"):
        load_table(path, classes=["neg", "pos"])


def test_single_class_file_is_rejected(tmp_path):
    with pytest.raises(InputError, match="1 distinct label"):
        load_table(write(tmp_path / "one.csv", "text,label\na,x\nb,x\n"))


def test_other_suffix_and_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"\.csv or \.jsonl"):
        load_table(tmp_path / "data.txt")
    with pytest.raises(InputError, match="does not exist"):
        load_task(str(tmp_path / "nope.csv"))


def test_non_utf8_csv(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        load_table(path)


def test_unknown_packaged_task_suggests_the_closest():
    with pytest.raises(InputError, match="Did you mean 'party'"):
        load_task("partyy")


def test_duplicate_task_names_are_rejected(tmp_path):
    (tmp_path / "x").mkdir()
    a = write(tmp_path / "same.csv", "text,label\na,0\nb,1\nc,0\nd,1\n")
    b = write(tmp_path / "x" / "same.csv", "text,label\na,0\nb,1\nc,0\nd,1\n")
    with pytest.raises(InputError, match="share the name 'same'"):
        load_splits([str(a), str(b)])


# ------------------------------------------------------------------ packaged tasks

EXPECTED_CLASSES = {
    "rt_sentiment": ("rotten", "fresh"),
    "subjectivity": ("plot", "review"),
    "bbc_topic": ("business", "entertainment", "politics", "sports", "tech"),
    "tweet_sentiment": ("negative", "neutral", "positive"),
    "party": ("republican", "democrat"),
    "debate_party": ("Republican", "Democratic", "Moderator"),
}


@pytest.mark.parametrize("name", list(EXPECTED_CLASSES))
def test_packaged_task_splits(name):
    pytest.importorskip("pandas")
    try:
        task = load_task(name)
    except InputError as exc:
        pytest.skip(f"benchmark data not installed: {exc}")
    split = task.split()
    distinct = len(set(task.texts))
    assert split.classes == EXPECTED_CLASSES[name]
    assert len(split.test_texts) == min(1000, int(0.4 * distinct))
    assert len(split.train_texts) == min(1500, distinct - len(split.test_texts))
    assert not set(split.train_texts) & set(split.test_texts)
    assert all(text.strip() for text in split.train_texts + split.test_texts)
    assert set(split.train_labels) == set(range(len(split.classes)))
    assert load_task(name).split().fingerprint() == split.fingerprint()


# ------------------------------------------------------------------ metrics


def test_accuracy_average_normalized():
    assert accuracy([0, 1, 1], [0, 1, 0]) == pytest.approx(2 / 3)
    assert accuracy(torch.tensor([2, 2]), torch.tensor([2, 2])) == 1.0
    scores = {"a": 0.5, "b": 0.9}
    assert average(scores) == pytest.approx(0.7)
    assert normalized_accuracy(scores, {"a": 1.0, "b": 0.9}) == pytest.approx(0.75)
    assert normalized_accuracy(scores, {"a": 0.5, "c": 0.3}) == pytest.approx(1.0)


def test_metric_errors():
    with pytest.raises(ValueError):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError):
        accuracy([], [])
    with pytest.raises(ValueError):
        normalized_accuracy({"a": 0.5}, {"b": 0.5})
    with pytest.raises(ValueError):
        normalized_accuracy({"a": 0.5}, {"a": 0.0})


def test_scores_summary():
    scores = Scores({"a": 0.6, "b": 0.8}, {"a": 0.8, "b": 0.8})
    assert scores.average == pytest.approx(0.7)
    assert scores.normalized == pytest.approx((0.75 + 1.0) / 2)
    assert Scores({"a": 0.6}).normalized is None
    assert Scores({"a": 0.6}).as_dict() == {"accuracy": {"a": 0.6}, "average": 0.6, "normalized": None}


def test_pad_batch():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ------------------------------------------------------------------ protocol, batches, keys


def test_bucketed_batches_cover_every_example_once():
    lengths = [(i * 37) % 61 + 1 for i in range(1000)]
    generator = torch.Generator().manual_seed(3)
    batches = bucketed_batches(lengths, 32, generator, pool=10)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert len(batches) == batches_per_epoch(1000, 32, 10)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # random batches would spread over ~55 tokens
    again = bucketed_batches(lengths, 32, torch.Generator().manual_seed(3), pool=10)
    assert again == batches


def test_warmup_then_linear_decay():
    schedule = warmup_linear(total_steps=100, warmup_fraction=0.1)
    assert [schedule(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(55) == pytest.approx(0.5)
    assert schedule(99) == pytest.approx(1 / 90)
    assert warmup_linear(5, 0.1)(0) == 1.0  # no warm-up steps when 10% rounds to 0


def test_epochs_for_small_tasks_and_task_seeds():
    protocol = TrainingProtocol(epochs=2, small_task_epochs=4, small_task_threshold=1000)
    assert protocol.epochs_for(999) == 4 and protocol.epochs_for(1000) == 2
    assert protocol.task_seed("a") == TrainingProtocol().task_seed("a") != protocol.task_seed("b")
    assert TrainingProtocol(seed=1).task_seed("a") != protocol.task_seed("a")


def test_task_key_reuse_and_invalidation():
    big, small = make_task(3000, name="big").split(), make_task(100, name="small").split()
    base = "f" * 64
    protocol = TrainingProtocol()
    assert task_key(protocol, base, big) == task_key(TrainingProtocol(), base, big)
    assert task_key(TrainingProtocol(learning_rate=2e-4), base, big) != task_key(protocol, base, big)
    assert task_key(TrainingProtocol(seed=1), base, big) != task_key(protocol, base, big)
    assert task_key(protocol, "e" * 64, big) != task_key(protocol, base, big)
    assert task_key(protocol, base, make_task(3001, name="big").split()) != task_key(protocol, base, big)
    # the small-task rule only re-keys the tasks it changes
    changed = TrainingProtocol(small_task_epochs=protocol.small_task_epochs + 1)
    assert task_key(changed, base, big) == task_key(protocol, base, big)
    assert task_key(changed, base, small) != task_key(protocol, base, small)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("PRIMERGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "primerge"
    monkeypatch.setenv("PRIMERGE_CACHE", str(tmp_path / "pc"))
    assert cache_root() == tmp_path / "pc"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("PRIMERGE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "primerge"


def test_task_name_must_be_a_folder_name(tmp_path):
    path = write(tmp_path / "my data.csv", "text,label\na,0\nb,1\n")
    with pytest.raises(InputError, match=r"my data\.csv: the task name 'my data'.*rename the file"):
        load_table(path)
    assert load_table(path, name="my_data").name == "my_data"
