"""token_classification through everything that exists: reading and alignment, seqeval's scores from
additive counts, training (one process, DDP and ZeRO-2 at world 2 reporting what world 1 reports), bit-exact
resume, ``eval`` on the export, ``predict``, transformers' pipeline, and bad input as one line.

The fixture is small and learnable: ~100 template sentences whose names always carry the same entity type
(PER, LOC, ORG; some names are two words, some split into several word pieces). Training runs are real
processes, each run once per module (``run``).
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from conftest import (NO_DROPOUT, assert_one_line_in_process, assert_resume_is_bit_exact, assert_same_evaluations,
                      bad_input_folder, cached_run, in_process, max_diff, records, run_cli, tiny_config)

PER = [["alice"], ["bob"], ["zorblax"], ["quintana"], ["mary", "jane"]]
LOC = [["paris"], ["london"], ["kathmandu"], ["new", "york"]]
ORG = [["acme"], ["globex", "corp"], ["initech"]]
TEMPLATES = [["P", "lives", "in", "L"], ["P", "works", "at", "O", "in", "L"], ["P", "met", "P", "yesterday"],
             ["yesterday", "P", "visited", "L", "with", "P"], ["the", "office", "of", "O", "is", "in", "L"]]


def sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    words, tags = [], []
    for slot in rng.choice(TEMPLATES):
        if slot not in "PLO":
            words.append(slot)
            tags.append("O")
            continue
        names, kind = {"P": (PER, "PER"), "L": (LOC, "LOC"), "O": (ORG, "ORG")}[slot]
        name = rng.choice(names)
        words += name
        tags += [("B-" if i == 0 else "I-") + kind for i in range(len(name))]
    return words, tags


def conll(rows) -> str:
    return "".join("".join(f"{w}\t{t}\n" for w, t in zip(*r)) + "\n" for r in rows)


def jsonl(rows) -> str:
    return "".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in rows)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """train.conll, validation.jsonl, test.conll / test.jsonl (the same sentences) and the config."""
    tmp = tmp_path_factory.mktemp("ner")
    rng = random.Random(0)
    splits = {split: [sentence(rng) for _ in range(n)] for split, n in (("train", 100), ("validation", 30),
                                                                        ("test", 30))}
    (tmp / "train.conll").write_text(conll(splits["train"]))
    (tmp / "validation.jsonl").write_text(jsonl(splits["validation"]))
    (tmp / "test.conll").write_text(conll(splits["test"]))
    (tmp / "test.jsonl").write_text(jsonl(splits["test"]))
    cfg = tiny_config(tmp, {"train": tmp / "train.conll", "validation": tmp / "validation.jsonl",
                            "test": tmp / "test.conll"},
                      model={"config": NO_DROPOUT, "tokenizer": "all-MiniLM-L6-v2"},
                      data={"text_column": "tokens", "label_column": "tags"},
                      task={"name": "token_classification"},
                      train={"epochs": 4, "micro_batch_size": 8, "lr": 3e-3},
                      # final/ = the last weights, so that a resumed run is compared after its interruption
                      checkpoint={"every_steps": 4, "keep_last_n": 2, "load_best_at_end": False},
                      logging={"every_steps": 4, "progress_bar": False, "tensorboard": False})
    return tmp, cfg


RUNS = {  # name: (processes, overrides); global batch 16 in all: 7 steps an epoch, the last one short
    "single": (1, ["engine.kind=single", "train.grad_accum=2"]),
    "ddp": (2, ["engine.kind=ddp", "train.grad_accum=1"]),
    "zero2": (2, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=2", "train.grad_accum=1"]),
}


def run(work, name: str, *extra, env=None, key=None):
    """Train ``name`` once per module (memoised by ``key``); returns (output folder, completed process)."""
    tmp, cfg = work
    return cached_run(tmp, cfg, RUNS, name, *extra, env=env, key=key)


def scores(report: dict) -> dict:
    """Everything of a report but the loss (a float sum whose order differs between ranks and batches)."""
    return {k: v for k, v in report.items() if k not in ("loss", "epoch")}


@pytest.mark.slow
def test_an_int8_onnx_tagger_agrees_with_pytorch_at_real_positions(work, tmp_path):
    """export --onnx --quantize int8 of a tagger: checked tag by tag at unpadded positions, then predict on it."""
    out, _ = run(work, "single")
    result = run_cli("export", out / "final", tmp_path / "onnx", "--onnx", "--quantize", "int8")
    assert result.returncode == 0, result.stderr[-3000:]
    check = json.loads((tmp_path / "onnx" / "dist_train.json").read_text())["onnx"]["check"]
    assert check["agreement"] >= 0.9 and check["inputs"] == 25
    result = run_cli("predict", tmp_path / "onnx", "Alice met Bob in Paris")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-3000:]


# -- metrics: seqeval's, from counts that add up over ranks ---------------------------------------------------
def evaluator_for(names: list[str]):
    from dist_train.data.labels import LabelMap
    from dist_train.tasks.token_classification import TagEvaluator, TokenClassificationTask

    task = TokenClassificationTask.__new__(TokenClassificationTask)
    task.labels = LabelMap(values=names, names=names)
    return TagEvaluator(task, torch.device("cpu"))


def feed(evaluator, gold: list[list[str]], pred: list[list[str]]) -> None:
    """One batch of sentences as the evaluator gets it from a model: padded labels, logits, word starts."""
    from types import SimpleNamespace

    index = {n: i for i, n in enumerate(evaluator.names)}
    width = max(map(len, gold)) + 2
    labels = torch.full((len(gold), width), -100)
    logits = torch.zeros(len(gold), width, len(index))
    starts = torch.zeros(len(gold), width, dtype=torch.bool)
    for row, (g, p) in enumerate(zip(gold, pred)):
        for i, (a, b) in enumerate(zip(g, p)):
            labels[row, i + 1], starts[row, i + 1] = index[a], True
            logits[row, i + 1, index[b]] = 5.0
    evaluator.update(SimpleNamespace(logits=logits), {"labels": labels, "word_start": starts})


def test_entity_scores_are_seqeval_s_from_counts_summed_over_ranks():
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    names = ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]
    rng = random.Random(1)
    gold = [[rng.choice(names) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    # Predictions: mostly right, some wrong tags, orphan I- tags (IOB1-style starts) and wrong boundaries.
    pred = [[t if rng.random() < 0.7 else rng.choice(names) for t in g] for g in gold]
    rank0, rank1 = evaluator_for(names), evaluator_for(names)
    for lo in range(0, 300, 16):  # batches alternate between the two "ranks"
        feed(rank0 if lo // 16 % 2 == 0 else rank1, gold[lo:lo + 16], pred[lo:lo + 16])
    report = rank0.compute(lambda state: rank0.state + rank1.state)
    assert report == rank1.compute(lambda state: rank0.state + rank1.state)

    assert report["n"] == 300 and report["words"] == sum(map(len, gold))
    assert report["entity_f1"] == f1_score(gold, pred)
    assert report["entity_precision"] == precision_score(gold, pred)
    assert report["entity_recall"] == recall_score(gold, pred)
    assert report["token_accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-15)
    expected = classification_report(gold, pred, output_dict=True)
    for kind, row in report["per_type"].items():
        assert row == {"precision": expected[kind]["precision"], "recall": expected[kind]["recall"],
                       "f1": expected[kind]["f1-score"], "support": expected[kind]["support"]}
    assert set(report["per_type"]) == {k for k in expected if "avg" not in k}
    assert report["entity_f1"] == expected["micro avg"]["f1-score"]


def test_tags_without_a_bio_scheme_score_each_word():
    names = ["DET", "NOUN", "VERB"]
    gold = [["DET", "NOUN", "VERB"], ["NOUN", "VERB"]]
    pred = [["DET", "VERB", "VERB"], ["NOUN", "VERB"]]
    ev = evaluator_for(names)
    feed(ev, gold, pred)
    report = ev.compute(lambda s: s)
    assert report["entity_precision"] == report["token_accuracy"] == 0.8
    assert report["entity_f1"] == pytest.approx(0.8)
    assert report["per_type"]["NOUN"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}


# -- reading and alignment -------------------------------------------------------------------------------------
def data_cfg(**kw):
    from dist_train.config import DataConfig

    return DataConfig(**kw)


def test_conll_variants_read_alike(tmp_path):
    from dist_train.data.tagged import read_tagged

    files = {
        "plain.conll": "Jane\tB-PER\nlives\tO\n\t\nin\tO\nParis\tB-LOC\n",
        "crlf_spaces.txt": "-DOCSTART- -X- -X- O\r\n\r\nJane NNP B-NP B-PER\r\nlives VBZ B-VP O\r\n  \r\n\r\n"
                           "in IN B-PP O\r\nParis NNP B-NP B-LOC\r\n",
        "named.conllu": "# global.columns = ID FORM NER\n# sent_id = 1\n1\tJane\tB-PER\n2\tlives\tO\n\n"
                        "# sent_id = 2\n1\tin\tO\n2\tParis\tB-LOC\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    expected = [{"tokens": ["Jane", "lives"], "tags": ["B-PER", "O"]}, {"tokens": ["in", "Paris"], "tags": ["O", "B-LOC"]}]
    for name, tag_column in (("plain.conll", None), ("crlf_spaces.txt", -1), ("named.conllu", "NER")):
        ds = read_tagged(str(tmp_path / name), data_cfg(tag_column=tag_column, cache_dir=str(tmp_path / "cache")),
                         "data.train")
        assert [{"tokens": r["tokens"], "tags": r["tags"]} for r in ds] == expected, name
    pos = read_tagged(str(tmp_path / "crlf_spaces.txt"), data_cfg(tag_column=1, cache_dir=str(tmp_path / "cache")),
                      "data.train")
    assert pos[0]["tags"] == ["NNP", "VBZ"] and pos["at"] == [3, 7]  # where each sentence starts


def test_first_piece_carries_the_tag_and_cut_words_are_counted():
    from dist_train.data.tagged import align, encode_words
    from dist_train.model.files import load_tokenizer

    tok = load_tokenizer("all-MiniLM-L6-v2")
    words = ["zorblax", "lives", "in", "\u200b", "paris"]  # a multi-piece word; a word with no piece at all
    enc = encode_words(tok, [words], 32)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"][0])
    assert pieces == ["[CLS]", "z", "##or", "##bla", "##x", "lives", "in", "[UNK]", "paris", "[SEP]"]
    tags = [1, 0, 0, 0, 2]
    labels, starts, cut = align(enc.word_ids(0), tags, all_pieces=False)
    assert labels == [-100, 1, -100, -100, -100, 0, 0, 0, 2, -100] and cut == 0
    assert starts == [0, 1, 0, 0, 0, 1, 1, 1, 1, 0]
    assert align(enc.word_ids(0), tags, all_pieces=True)[0] == [-100, 1, 1, 1, 1, 0, 0, 0, 2, -100]
    short = encode_words(tok, [words], 6)  # [CLS] z ##or ##bla ##x [SEP]: 4 words cut
    assert align(short.word_ids(0), tags, all_pieces=False)[2] == 4


def test_truncation_is_reported_once_with_the_count(work, tmp_path, capfd):
    from dist_train.config import load_config
    from dist_train.tasks import build_task

    _, cfg_path = work
    cfg = load_config(cfg_path, ["data.max_length=6", f"data.cache_dir={tmp_path}", "data.test=null"])
    task = build_task(cfg)
    task.prepare(task.load_tokenizer())
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "warning" in line]
    assert len(lines) == 2, err  # train and validation
    assert re.search(r"data\.train '.*train\.conll': \d+ words of \d+ sentences lie beyond max_length 6", lines[0])


# -- training, world 2, resume ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_learns_the_tags(work):
    out, result = run(work, "single")
    report = json.loads((out / "eval_report.json").read_text())
    assert report["n"] == 30 and report["entity_f1"] > 0.9 and report["token_accuracy"] > 0.9, report
    assert set(report["per_type"]) == {"LOC", "ORG", "PER"}
    assert re.search(r"^test: loss [\d.]+ entity_f1 [\d.]+ entity_precision", result.stdout, re.M), result.stdout
    validation = records(out, "validation")
    assert len(validation) == 4 and validation[-1]["entity_f1"] > validation[0]["entity_f1"]
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"] and config["id2label"]["0"] == "B-LOC"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "zero2"])
def test_world_2_reports_what_world_1_reports(work, name):
    reference, _ = run(work, "single")
    out, _ = run(work, name)
    assert max_diff(reference / "final", out / "final") < 1e-4
    assert_same_evaluations(reference, out, scores)


@pytest.mark.slow
def test_resume_is_bit_exact(work):
    assert_resume_is_bit_exact(run, work, fail_at=10, resumed_at=8)


# -- using the export ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("data", ["test.conll", "test.jsonl"])
def test_eval_on_the_export_reproduces_the_test_report(work, data, capfd):
    out, _ = run(work, "single")
    code, stdout, stderr = in_process(["eval", out / "final", "--data", work[0] / data], capfd)
    assert code == 0, stderr
    report, expected = json.loads(stdout), json.loads((out / "eval_report.json").read_text())
    assert scores(report) == scores(expected)
    assert report["loss"] == pytest.approx(expected["loss"], abs=1e-6)


def test_predict_prints_entities_with_word_spans(work, tmp_path, capfd):
    out, _ = run(work, "single")
    code, stdout, stderr = in_process(["predict", out / "final", "alice lives in paris", "mary jane works at acme",
                                "the"], capfd)
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert re.fullmatch(r"PER alice \[0:1\] 0\.\d\d \| LOC paris \[3:4\] 0\.\d\d\talice lives in paris", lines[0]), lines
    assert re.fullmatch(r"PER mary jane \[0:2\] 0\.\d\d \| ORG acme \[4:5\] 0\.\d\d\tmary jane works at acme",
                        lines[1]), lines
    assert lines[2] == "-\tthe"

    (tmp_path / "in.jsonl").write_text(json.dumps({"tokens": ["bob", "visited", "london"]}) + "\n"
                                       + json.dumps({"tokens": ["the"]}) + "\n")
    code, stdout, stderr = in_process(["predict", out / "final", "--file", tmp_path / "in.jsonl", "--output",
                                tmp_path / "out.tsv"], capfd)
    assert code == 0, stderr
    header, first, second = (line.split("\t") for line in (tmp_path / "out.tsv").read_text().splitlines())
    assert header == ["tokens", "entities", "tags", "words_cut"]
    assert first[0] == "bob visited london" and first[2:] == ["B-PER O B-LOC", "0"]
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in json.loads(first[1])] == [
        ("PER", "bob", 0, 1), ("LOC", "london", 2, 3)]
    assert second[1:] == ["[]", "O", "0"]


def test_the_export_works_in_transformers_pipeline(work):
    from transformers import pipeline

    out, _ = run(work, "single")
    ner = pipeline("token-classification", model=str(out / "final"), aggregation_strategy="simple")
    found = [(e["entity_group"], e["word"], e["start"], e["end"]) for e in ner("alice lives in new york")]
    assert found == [("PER", "alice", 0, 5), ("LOC", "new york", 15, 23)]


# -- bad input: one line, exit 2, nothing written --------------------------------------------------------------
BAD_FILES = {
    "missing_tag.conll": "alice\tB-PER\nlives\tO\nin\tO\nparis\n",
    "empty_word.conll": "alice\tB-PER\n\tO\n",
    "empty_tag.conll": "alice\tB-PER\nlives\t \n",
    "one_tag.conll": "lives\tO\nin\tO\n",
    "unseen.conll": "alice\tB-PER\n\nbob\tB-PER\nvisited\tO\nrome\tB-GPE\n",
    "mismatch.jsonl": '{"tokens": ["alice", "lives"], "tags": ["B-PER", "O"]}\n'
                      '{"tokens": ["bob", "visited", "paris"], "tags": ["B-PER", "O"]}\n',
    "empty.jsonl": '{"tokens": ["alice"], "tags": ["B-PER"]}\n{"tokens": [], "tags": []}\n',
    "text.jsonl": '{"tokens": "alice lives in paris", "tags": ["B-PER", "O", "O", "B-LOC"]}\n',
    "unseen.jsonl": '{"tokens": ["alice"], "tags": ["B-PER"]}\n{"tokens": ["bob", "in", "rome"], '
                    '"tags": ["B-PER", "O", "B-GPE"]}\n',
    "blank.conll": "\n \n\t\n",
}
BAD = [  # (id, argv after `dist-train`, fragment of the one line)
    ("conll-word-without-tag", "train {cfg} data.train={d}/missing_tag.conll",
     "missing_tag.conll': line 4: expected a word and its tag separated by a tab, found 1 column"),
    ("conll-empty-word", "train {cfg} data.train={d}/empty_word.conll", "empty_word.conll': line 2: empty word"),
    ("conll-empty-tag", "train {cfg} data.train={d}/empty_tag.conll", "line 2: word 'lives' has an empty tag"),
    ("conll-no-sentences", "train {cfg} data.train={d}/blank.conll", "data.train: '"),
    ("conll-one-tag", "train {cfg} data.train={d}/one_tag.conll", "only one tag ('O') in the training data"),
    ("conll-unseen-tag-validation", "train {cfg} data.validation={d}/unseen.conll",
     "unseen.conll': line 5: tag 'B-GPE' never appears in the training data"),
    ("jsonl-count-mismatch", "train {cfg} data.validation={d}/mismatch.jsonl",
     "mismatch.jsonl': line 2: 3 tokens but 2 tags"),
    ("jsonl-empty-sentence", "train {cfg} data.test={d}/empty.jsonl", "empty.jsonl': line 2: empty sentence"),
    ("jsonl-text-not-tokens", "train {cfg} data.test={d}/text.jsonl", "column 'tokens' holds a str, not a list"),
    ("jsonl-unseen-tag-test", "train {cfg} data.test={d}/unseen.jsonl",
     "unseen.jsonl': line 2, token 3: tag 'B-GPE' never appears in the training data"),
    ("tag-column-name-undeclared", "train {cfg} data.tag_column=NER",
     "data.tag_column 'NER' is a column name, but the file does not name its columns"),
    ("pair-column", "train {cfg} data.text_pair_column=other", "data.text_pair_column: token_classification"),
    ("metric", "train {cfg} checkpoint.metric=accuracy", "not a token_classification metric; choose one of: entity_f1"),
    ("missing-file", "train {cfg} data.test={d}/nope.conll", "data.test: '"),
    ("eval-unseen-tag", "eval {final} --data {d}/unseen.conll", "line 5: tag 'B-GPE' never appears"),
    ("eval-mismatch", "eval {final} --data {d}/mismatch.jsonl", "line 2: 3 tokens but 2 tags"),
    ("predict-file-conll", "predict {final} --file {d}/unseen.conll --output {d}/out.tsv", "give a .jsonl/.parquet"),
]


@pytest.fixture(scope="module")
def bad(work):
    tmp, cfg = work
    return bad_input_folder(tmp, cfg, BAD_FILES)


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(work, bad, case, capfd):
    _, argv, fragment = case
    out, _ = run(work, "single")
    argv = argv.format(cfg=bad / "config.yaml", d=bad / "data", final=out / "final").split()
    assert_one_line_in_process(argv, capfd, fragment, bad, out)
