"""Data: every format, label mapping, every data error, cached tokenization, padding and batch plans."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import SENTIMENT, head
from transformers import DataCollatorWithPadding

from dist_train.config import DataConfig
from dist_train.data import make_loader
from dist_train.data.labels import LabelMap
from dist_train.data.sampler import eval_plan, train_plan
from dist_train.data.sources import read_table
from dist_train.data.tokenize import model_view, tokenize_table
from dist_train.errors import UserError
from dist_train.model.files import load_tokenizer
from dist_train.tasks.classification import read_labelled

ROWS = [("A gripping, beautiful film.", "pos"), ('He said "meh" and left.', "neg"),
        ("Not bad at all, honestly.", "pos"), ("Dull\u2014and far too long.", "neg")]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("all-MiniLM-L6-v2")


def write(tmp_path, fmt, rows=ROWS, columns=("text", "sentiment")):
    df = pd.DataFrame(rows, columns=list(columns))
    path = tmp_path / f"data.{fmt}"
    if fmt == "tsv":
        path.write_text("\t".join(columns) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    elif fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    elif fmt == "parquet":
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet"])
def test_every_format_reads_the_same_rows(tmp_path, fmt):
    path = write(tmp_path, fmt)
    cfg = DataConfig(text_column="text", label_column="sentiment", cache_dir=str(tmp_path / "cache"))
    ds, labels, ids = read_labelled(str(path), cfg)
    assert ds["text"] == [r[0] for r in ROWS]  # quotes and unicode survive, TSV included
    assert labels.values == ["neg", "pos"] and labels.names == ["neg", "pos"]
    assert ids == [1, 0, 1, 0]


def test_int_labels_keep_their_order_and_take_names(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("sentence\tlabel\na\t2\nb\t0\nc\t1\nd\t2\n")
    ds, labels, ids = read_labelled(str(path), DataConfig(), names=["low", "mid", "high"])
    assert labels.values == [0, 1, 2] and labels.id2label == {0: "low", 1: "mid", 2: "high"}
    assert ids == [2, 0, 1, 2]


def test_label_mapping_roundtrips_through_its_file(tmp_path):
    labels = LabelMap.from_train(["b", "a", "c", "a"], "t.tsv")
    labels.save(tmp_path)
    assert LabelMap.load(tmp_path) == labels
    assert labels.label2id == {"a": 0, "b": 1, "c": 2}


def test_unseen_label_names_file_and_line(tmp_path):
    train = write(tmp_path, "tsv")
    test = tmp_path / "test.tsv"
    test.write_text("text\tsentiment\nok\tpos\nhm\tmeh\n")
    cfg = DataConfig(text_column="text", label_column="sentiment")
    _, labels, _ = read_labelled(str(train), cfg)
    with pytest.raises(UserError) as err:
        read_labelled(str(test), cfg, labels)
    assert f"'{test}': line 3: label 'meh' never appears in the training data (known labels: neg, pos)" in str(err.value)


def test_missing_column_lists_columns_found(tmp_path):
    path = write(tmp_path, "csv")
    with pytest.raises(UserError) as err:
        read_labelled(str(path), DataConfig(text_column="review", label_column="sentiment"))
    assert "no column 'review' (columns found: text, sentiment); set data.text_column" in str(err.value)


@pytest.mark.parametrize("content, needle", [
    ("", "the file is empty"),
    ("sentence\tlabel\n", "has a header but no rows"),
    ("sentence\tlabel\ngood\t1\nbad\t0\textra\n", "line 3: malformed row: expected 2 fields, saw 3"),
    ("sentence\tlabel\ngood\t1\nbad\t\n", "line 3: missing label"),
    ("sentence\tlabel\ngood\t1\nbad\tneg\nfine\t0\n", "mixed label types"),
    ("sentence\tlabel\ngood\t0.5\nbad\t1\n", "line 2: label 0.5 is not a class"),
    ("sentence\tlabel\ngood\t1\n\t0\n", "line 3: empty or missing text"),
    ("sentence\tlabel\ngood\t1\n", "only one label value"),
])
def test_bad_tsv_is_one_clear_error(tmp_path, content, needle):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        read_labelled(str(path), DataConfig(cache_dir=str(tmp_path / "cache")))
    assert needle in str(err.value) and str(path) in str(err.value)


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sentence": "ok", "label": 1}\n{"sentence": "broken", "label": \n')
    with pytest.raises(UserError, match="line 2"):
        read_table(str(path), str(tmp_path / "cache"))


def test_unreadable_paths(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        read_table(str(tmp_path / "missing.tsv"))
    with pytest.raises(UserError, match="is a folder"):
        read_table(str(tmp_path))
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(UserError, match="unknown file type '.txt'"):
        read_table(str(tmp_path / "x.txt"))
    bin_path = tmp_path / "binary.tsv"
    bin_path.write_bytes(b"sentence\tlabel\n\xff\xfe\x00bad\t1\n")
    with pytest.raises(UserError, match="binary.tsv"):
        read_table(str(bin_path), str(tmp_path / "cache"))


def test_tokenization_is_cached_across_runs(tmp_path, tokenizer):
    path = tmp_path / "train.tsv"
    path.write_text(head(SENTIMENT / "dev.tsv", 50))
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))

    def load():
        ds, _, ids = read_labelled(str(path), cfg)
        return tokenize_table(ds, tokenizer, "sentence", None, 32, ids)

    first, second = load(), load()
    assert first.cache_files and first.cache_files == second.cache_files  # same Arrow file, not re-tokenized
    assert first._fingerprint == second._fingerprint
    other = tokenize_table(read_labelled(str(path), cfg)[0], tokenizer, "sentence", None, 16, None)
    assert other._fingerprint != first._fingerprint  # a different max_length re-tokenizes
    assert max(first["length"]) == 32


def test_batches_pad_to_their_own_longest_not_the_dataset(tmp_path, tokenizer):
    path = tmp_path / "train.tsv"
    path.write_text(head(SENTIMENT / "dev.tsv", 64))
    ds, _, ids = read_labelled(str(path), DataConfig(cache_dir=str(tmp_path / "cache")))
    ds = tokenize_table(ds, tokenizer, "sentence", None, 128, ids)
    lengths = ds["length"]
    batches = [b for b, _ in eval_plan(lengths, 8)]
    widths = [b["input_ids"].shape[1] for b in make_loader(model_view(ds), batches, DataCollatorWithPadding(tokenizer))]
    assert widths == [max(lengths[i] for i in b) for b in batches]
    assert min(widths) < max(lengths)


def test_train_plan_is_deterministic_and_covers_each_example_once():
    lengths = [(i * 37) % 50 + 1 for i in range(203)]
    for group in (False, True):
        plan = train_plan(lengths, 8, seed=3, epoch=1, group_by_length=group)
        assert plan == train_plan(lengths, 8, seed=3, epoch=1, group_by_length=group)
        assert sorted(i for b in plan for i in b) == list(range(203))
        assert plan != train_plan(lengths, 8, seed=3, epoch=2, group_by_length=group)


def test_group_by_length_cuts_padding():
    lengths = [(i * 37) % 120 + 2 for i in range(1600)]

    def padded(plan):
        return sum(len(b) * max(lengths[i] for i in b) for b in plan)

    plain = padded(train_plan(lengths, 16, 0, 0, False))
    grouped = padded(train_plan(lengths, 16, 0, 0, True))
    assert grouped < 0.7 * plain


def test_eval_plan_shards_every_example_exactly_once():
    lengths = list(range(1001))
    for world in (1, 2, 3):
        shards = [eval_plan(lengths, 16, rank, world) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1  # same number of forward passes on every rank
        seen = sorted(i for shard in shards for b, w in shard if w for i in b)
        assert seen == list(range(1001))


def test_step_windows_split_the_global_batch_the_same_way_at_any_world_size():
    from dist_train.data.sampler import step_windows

    plan = train_plan(list(range(1, 38)), 2, seed=0, epoch=0, group_by_length=False)  # 19 batches, last short
    for ga, world in ((8, 1), (4, 2), (2, 4)):
        steps = [step_windows(plan, ga, r, world) for r in range(world)]
        assert len(steps[0]) == 3  # 8 batches per step: 8 + 8 + 3
        for s in range(3):
            real = sorted(i for r in range(world) for b, w in steps[r][s] if w for i in b)
            assert real == sorted(i for b in plan[s * 8:(s + 1) * 8] for i in b)
            assert len({len(steps[r][s]) for r in range(world)}) == 1


def test_saved_labels_file_is_json(tmp_path):
    LabelMap.from_train([1, 0], "t.tsv", ["neg", "pos"]).save(tmp_path)
    assert json.loads((tmp_path / "labels.json").read_text()) == {"values": [0, 1], "names": ["neg", "pos"]}


def test_validation_split_is_carved_from_train(tmp_path, sentiment_slice):
    from dist_train.config import load_config
    from dist_train.tasks import build_task

    cfg = load_config(None, ["model.pretrained=all-MiniLM-L6-v2", f"data.train={sentiment_slice['train']}",
                             "data.validation_split=0.25", f"data.cache_dir={tmp_path / 'cache'}"])
    task = build_task(cfg)
    splits = task.prepare(load_tokenizer("all-MiniLM-L6-v2"))
    assert (len(splits.train), len(splits.validation)) == (120, 40)
    again = task.prepare(load_tokenizer("all-MiniLM-L6-v2"))
    assert again.validation["input_ids"] == splits.validation["input_ids"]  # same seed, same split


def test_check_data_files_names_the_key_and_loads_nothing(tmp_path):
    from dist_train.data import check_data_files

    good = write(tmp_path, "tsv")
    check_data_files(DataConfig(train=str(good), test=str(good)))
    with pytest.raises(UserError, match=r"data\.validation: '.*missing\.tsv': file not found"):
        check_data_files(DataConfig(train=str(good), validation=str(tmp_path / "missing.tsv")))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Some text.\n")
    check_data_files(DataConfig(train=[str(corpus), str(corpus / "*.txt")]), tables=False)
    with pytest.raises(UserError, match=r"data\.test: no file matches"):
        check_data_files(DataConfig(train=str(corpus), test=str(tmp_path / "*.md")), tables=False)


@pytest.mark.parametrize("name, content, needle", [
    ("latin1.csv", "sentence,label\ngood,1\ncaf\u00e9,0\n".encode("latin-1"), "line 3: byte 0xe9 at column 4"),
    ("latin1.jsonl", '{"sentence": "ok", "label": 1}\n{"sentence": "caf\u00e9", "label": 0}\n'.encode("latin-1"),
     "line 2: byte 0xe9"),
    ("comma.tsv", b"sentence,label\ngood,1\n", "looks comma-separated; rename it to .csv"),
    ("tabs.csv", b"sentence\tlabel\ngood\t1\n", "looks tab-separated; rename it to .tsv"),
])
def test_encoding_and_delimiter_mistakes_name_the_fix(tmp_path, capfd, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=needle):
        read_table(str(path), str(tmp_path / "cache"))
    assert capfd.readouterr().err == ""  # no "Failed to read file ..." from datasets before our line


def test_train_rows_are_stratified_nested_and_seeded():
    """data.train_rows: every label keeps its share (within one row), a smaller subset lies inside every larger
    one for the same seed, and another seed draws other rows."""
    from collections import Counter

    from dist_train.data.subset import nested_order

    labels = ["pos"] * 600 + ["neg"] * 300 + ["mixed"] * 100  # 60 / 30 / 10 %
    order = nested_order(labels, len(labels), seed=7)
    assert sorted(order) == list(range(1000)) and order == nested_order(labels, 1000, seed=7)
    for n in (10, 37, 100, 333, 1000):
        counts = Counter(labels[i] for i in order[:n])
        for label, share in (("pos", 0.6), ("neg", 0.3), ("mixed", 0.1)):
            assert abs(counts[label] - share * n) <= 1, (n, counts)
    assert set(order[:100]) < set(order[:300]) < set(order[:1000])
    assert len(set(order[:100]) & set(nested_order(labels, 1000, seed=8)[:100])) < 50
    unstratified = nested_order(None, 1000, seed=7)
    assert sorted(unstratified) == list(range(1000)) and unstratified != list(range(1000))


def test_training_on_train_rows_sees_exactly_those_rows(tmp_path, sentiment_slice):
    """A run with data.train_rows=40 trains on 40 examples an epoch, stratified as the whole file is."""
    from collections import Counter

    from conftest import tiny_config
    from test_train import run

    cfg_path = tiny_config(tmp_path, {"train": sentiment_slice["train"]}, train={"epochs": 2, "micro_batch_size": 8},
                           logging={"every_steps": 1, "progress_bar": False, "tensorboard": False})
    cfg, _ = run(cfg_path, "data.train_rows=40", "checkpoint.every_epoch=false")
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r["split"] == "train"][-1]["examples_seen"] == 80  # 2 epochs x 40
    whole = Counter(line.split("\t")[1] for line in sentiment_slice["train"].read_text().splitlines()[1:])
    from dist_train.tasks import build_task

    task = build_task(cfg)
    subset = task.train_subset(task.prepare(task.load_tokenizer()).train)
    kept = Counter(task.labels.id2label[i] for i in subset["labels"])
    assert len(subset) == 40 and all(abs(kept[k] - 40 * whole[k] / sum(whole.values())) <= 1 for k in whole)
