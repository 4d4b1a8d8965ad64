"""question_answering through everything that exists: SQuAD JSON and flat JSON lines read alike; long contexts
cut into overlapping windows with answers at window edges kept whole; the best span over all windows and
the no-answer rule; training (one process, DDP and ZeRO-3 at world 2 reporting what world 1 reports, with an
example's windows on different ranks; FSDP2 too); bit-exact resume; ``eval`` on the export; ``predict`` (--question /
--context, pairs, --file) = the export read with transformers' own AutoModelForQuestionAnswering; bad input
as one line.

No openly licensed QA data exists offline, so the data is written here: contexts of filler words that hold
"the code word is NAME ." (the answer NAME), longer than one window, and unanswerable questions whose
context holds no code word (SQuAD 2.0 style).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from conftest import (NO_DROPOUT, assert_one_line_in_process, assert_resume_is_bit_exact, assert_same_evaluations,
                      bad_input_folder, cached_run, in_process, tiny_config)

FILLER = ("the a river stone green quiet morning house road window table garden letter music paper cloud "
          "bridge forest candle mirror").split()
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]


def example(rng: random.Random, i: int, answerable: bool = True) -> dict:
    before = [rng.choice(FILLER) for _ in range(rng.randint(4, 40))]
    after = [rng.choice(FILLER) for _ in range(rng.randint(4, 30))]
    name = rng.choice(NAMES)
    fact = ["the", "code", "word", "is", name, "."] if answerable else ["no", "code", "here", "."]
    context = " ".join(before + fact + after)
    answers = {"text": [name], "answer_start": [context.index(f"code word is {name}") + 13]} if answerable else \
        {"text": [], "answer_start": []}
    return {"id": f"q{i}", "question": "what is the code word ?", "context": context, "answers": answers}


def squad_json(rows: list[dict]) -> str:
    """The same questions in SQuAD 2.0's nested layout (one paragraph per context)."""
    paragraphs = [{"context": r["context"], "qas": [{
        "id": r["id"], "question": r["question"], "is_impossible": not r["answers"]["text"],
        "answers": [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}]}
        for r in rows]
    return json.dumps({"version": "v2.0", "data": [{"title": "codes", "paragraphs": paragraphs}]})


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qa")
    rng = random.Random(0)
    splits = {split: [example(rng, i, answerable=i % 5 != 0) for i in range(n)]
              for split, n in (("train", 160), ("validation", 30), ("test", 40))}
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in splits["train"]))
    (tmp / "validation.json").write_text(squad_json(splits["validation"]))
    (tmp / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in splits["test"]))
    (tmp / "test.json").write_text(squad_json(splits["test"]))
    cfg = tiny_config(tmp, {"train": tmp / "train.jsonl", "validation": tmp / "validation.json",
                            "test": tmp / "test.jsonl"},
                      model={"config": NO_DROPOUT, "tokenizer": "all-MiniLM-L6-v2"},
                      data={"max_length": 32},
                      task={"name": "question_answering", "stride": 12, "max_answer_length": 5},
                      train={"epochs": 3, "micro_batch_size": 16, "lr": 3e-3},
                      checkpoint={"every_steps": 20, "keep_last_n": 2, "load_best_at_end": False},
                      logging={"every_steps": 20, "progress_bar": False, "tensorboard": False})
    return tmp, cfg, splits


RUNS = {  # name: (processes, overrides); global batch 32 in all
    "single": (1, ["engine.kind=single", "train.grad_accum=2"]),
    "ddp": (2, ["engine.kind=ddp", "train.grad_accum=1"]),
    "zero3": (2, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3", "train.grad_accum=1"]),
    "fsdp": (2, ["engine.kind=fsdp", "train.grad_accum=1"]),
}


def run(work, name: str, *extra, env=None, key=None):
    tmp, cfg, _ = work
    return cached_run(tmp, cfg, RUNS, name, *extra, env=env, key=key)



def scores(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("loss", "epoch")}


def tokenizer():
    from dist_train.model.files import load_tokenizer

    return load_tokenizer("all-MiniLM-L6-v2", False, what="model.tokenizer")


# -- data: both layouts, windows, targets -----------------------------------------------------------------------
def test_squad_json_and_json_lines_read_alike(work):
    from dist_train.data.squad import read_squad

    tmp, _, splits = work
    nested, flat = read_squad(str(tmp / "test.json"), "data.test"), read_squad(str(tmp / "test.jsonl"), "data.test")
    assert nested == flat and len(flat) == 40
    assert sum(not e["answer_texts"] for e in flat) == 8
    e = flat[1]
    assert e["context"][e["answer_starts"][0]:].startswith(e["answer_texts"][0])


def test_windows_overlap_and_an_answer_at_a_window_edge_lies_whole_in_one():
    from dist_train.data.squad import tokenize_windows

    tok = tokenizer()
    words = [f"w{i}" for i in range(60)]
    found_edge = False
    examples = []
    for at in range(8, 40):  # the answer ("code word" at word `at`) moves across every window edge
        context = " ".join(words[:at] + ["code", "word"] + words[at:])
        examples.append({"id": "x", "question": "what?", "context": context, "answer_texts": ["code word"],
                         "answer_starts": [context.index("code word")]})
    every = tokenize_windows(examples, tok, 32, 12)
    for e, example in enumerate(examples):
        context, start = example["context"], example["answer_starts"][0]
        mine = [w for w, x in enumerate(every["example"]) if x == e]
        ds = every.select(mine)
        assert len(ds) >= 3
        holding = [w for w in range(len(ds)) if ds[w]["start_positions"] != 0]
        assert holding, e
        for w in range(len(ds)):
            row = ds[w]
            a, b = row["start_positions"], row["end_positions"]
            spans = [o for o in row["offsets"] if o[0] >= 0]
            whole = spans[0][0] <= start and spans[-1][1] >= start + 9
            if a == 0:
                assert not whole and b == 0  # a window that cuts the answer (or misses it) trains on "none here"
                found_edge |= spans[0][0] <= start < spans[-1][1]
            else:
                assert context[row["offsets"][a][0]:row["offsets"][b][1]] == "code word"
        # consecutive windows share `stride` tokens of context
        first, second = ds[0]["offsets"], ds[1]["offsets"]
        shared = [o for o in first if o[0] >= 0 and o in second]
        assert len(shared) == 12
    assert found_edge


def test_the_best_span_is_the_best_over_windows_and_no_answer_needs_to_win_by_the_threshold():
    from dist_train.tasks.question_answering import NO_SPAN, answers, best_spans

    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    offsets = torch.tensor([[[-1, -1]] * 3 + [[i * 4, i * 4 + 3] for i in range(6)] + [[-1, -1]]] * 3)
    attention = torch.ones(3, 10, dtype=torch.long)
    table = best_spans(start, end, offsets, attention, max_answer_length=3)
    for w in range(3):  # brute force over every allowed span
        best = max((start[w, i] + end[w, j], i, j) for i in range(3, 9) for j in range(i, min(i + 3, 9)))
        assert table[w, 0].item() == pytest.approx(best[0].item())
        assert table[w, 1:3].tolist() == [best[1] * 4 - 12, best[2] * 4 - 12 + 3]
        assert table[w, 3].item() == pytest.approx((start[w, 0] + end[w, 0]).item())
    rows = np.array([[2.0, 0, 5, 1.0], [3.0, 4, 9, 2.5], [NO_SPAN, -1, -1, 0.5]])
    context = ["0123456789"]
    got = answers(rows, [0, 0, 0], context, 1, allow_null=False, threshold=0.0)[0]
    assert (got["answer"], got["start"], got["end"]) == ("45678", 4, 9)
    assert answers(rows, [0, 0, 0], context, 1, allow_null=True, threshold=0.0)[0]["answer"] == "45678"
    rows[:, 3] = 3.5  # no-answer 3.5 beats the best span (3.0) by 0.5
    assert answers(rows, [0, 0, 0], context, 1, allow_null=True, threshold=0.0)[0]["answer"] == ""
    assert answers(rows, [0, 0, 0], context, 1, allow_null=True, threshold=1.0)[0]["answer"] == "45678"


# -- training ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_learns_to_answer_and_to_say_no_answer(work):
    out, result = run(work, "single")
    report = json.loads((out / "eval_report.json").read_text())
    assert report["n"] == 40 and report["windows"] > 80, report  # several windows per question
    assert report["exact_match"] > 80 and report["f1"] >= report["exact_match"], report
    assert report["has_answer_n"] == 32 and report["no_answer_n"] == 8 and report["no_answer_exact_match"] > 50
    assert "test: loss" in result.stdout and " exact_match " in result.stdout
    outputs = [json.loads(x) for x in (out / "test_outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == 40 and {o["id"] for o in outputs} == {f"q{i}" for i in range(40)}
    right = sum(o["prediction"] in (o["answers"] or [""]) for o in outputs)
    assert right == round(report["exact_match"] * 40 / 100)
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["BertForQuestionAnswering"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "zero3", "fsdp"])
def test_world_2_reports_what_world_1_reports(work, name):
    from safetensors.torch import load_file

    reference, _ = run(work, "single")
    out, _ = run(work, name)
    a, b = (load_file(x / "final" / "model.safetensors") for x in (reference, out))
    # Softmax ignores a shift, so the gradient of the start/end bias and of attention key biases is 0 plus
    # rounding noise, which Adam scales to lr-sized steps: ZeRO-3 rounds in another order (measured: 5.9e-3 on
    # qa_outputs.bias, 1e-4 on key biases, everything else < 1e-3). DDP ends bit-identical.
    noise = {k for k in a if k == "qa_outputs.bias" or k.endswith("attention.self.key.bias")}
    assert max((a[k] - b[k]).abs().max().item() for k in a if k not in noise) < (1e-6 if name == "ddp" else 1e-3)
    assert_same_evaluations(reference, out, scores)


@pytest.mark.slow
def test_resume_is_bit_exact(work):
    assert_resume_is_bit_exact(run, work, fail_at=25, resumed_at=20)


# -- using the export ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("data", ["test.jsonl", "test.json"])
def test_eval_on_the_export_reproduces_the_test_report(work, data, capfd):
    out, _ = run(work, "single")
    code, stdout, stderr = in_process(["eval", out / "final", "--data", work[0] / data], capfd)
    assert code == 0, stderr
    report, expected = json.loads(stdout), json.loads((out / "eval_report.json").read_text())
    assert scores(report) == scores(expected)


def test_predict_answers_as_transformers_reads_the_export(work, tmp_path, capfd):
    """dist-train predict's answers = the span of the highest start + end logits over the context, computed
    here from transformers' AutoModelForQuestionAnswering on the export (one window per question)."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    out, _ = run(work, "single")
    _, _, splits = work
    rows = [r for r in splits["test"] if len(r["context"].split()) < 14][:3]
    rows += [{"question": "what is the code word ?", "context": "river the code word is judy . stone"}]
    code, stdout, stderr = in_process(["predict", out / "final", "--question", rows[-1]["question"], "--context",
                                rows[-1]["context"]], capfd)
    assert code == 0, stderr
    assert stdout.split("\t")[0] == "judy", stdout
    code, stdout, stderr = in_process(["predict", out / "final", *[x for r in rows for x in (r["question"], r["context"])]],
                               capfd)
    assert code == 0, stderr
    printed = [line.split("\t")[0] for line in stdout.splitlines()]
    tok = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForQuestionAnswering.from_pretrained(out / "final").eval()
    for row, answer in zip(rows, printed):
        enc = tok(row["question"], row["context"], return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping")[0]
        with torch.no_grad():
            o = model(**enc)
        context = torch.tensor([s == 1 for s in enc.sequence_ids(0)])
        s, e = o.start_logits[0], o.end_logits[0]
        spans = [(s[i] + e[j], i, j) for i in range(len(s)) for j in range(i, min(i + 5, len(s)))
                 if context[i] and context[j]]
        score, i, j = max(spans)
        null = s[0] + e[0]
        expected = "" if null > score else row["context"][offsets[i][0]:offsets[j][1]]
        assert (answer if answer != "(no answer)" else "") == expected, (row, stdout)
    # --file: JSON lines -> TSV with the answer and its character span
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question": r["question"], "context": r["context"]}) + "\n"
                                              for r in rows))
    code, stdout, stderr = in_process(["predict", out / "final", "--file", tmp_path / "q.jsonl", "--output",
                                tmp_path / "a.tsv"], capfd)
    assert code == 0, stderr
    lines = (tmp_path / "a.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["question", "context", "answer", "start", "end", "score"]
    for row, line, answer in zip(rows, lines[1:], printed):
        cells = line.split("\t")
        assert cells[2] == (answer if answer != "(no answer)" else "")
        if cells[2]:
            assert row["context"][int(cells[3]):int(cells[4])] == cells[2]


# -- bad input ------------------------------------------------------------------------------------------------
def bad_rows() -> dict[str, str]:
    good = {"id": "a", "question": "what?", "context": "the code word is bob .", "answers": {"text": ["bob"],
                                                                                          "answer_start": [17]}}
    moved = {**good, "answers": {"text": ["bob"], "answer_start": [3]}}
    outside = {**good, "answers": {"text": ["bob"], "answer_start": [99]}}
    empty_q = {**good, "question": "  "}
    return {"moved.jsonl": json.dumps(good) + "\n" + json.dumps(moved) + "\n",
            "outside.jsonl": json.dumps(outside) + "\n", "empty_q.json": squad_json([empty_q]),
            "table.tsv": "question\tcontext\nwhat?\tbob\n", "broken.jsonl": json.dumps(good) + "\n{oops\n"}


BAD = [  # (id, argv, fragment of the one error line)
    ("answer-not-at-start", "train {cfg} data.train={d}/moved.jsonl",
     "line 2 (id 'a'): the answer 'bob' is not at its answer_start 3 (the context there reads ' co')"),
    ("answer-start-outside", "train {cfg} data.train={d}/outside.jsonl", "answer_start 99 is outside the context"),
    ("empty-question", "train {cfg} data.train={d}/empty_q.json", "(data[0].paragraphs[0].qas[0]): empty or missing question"),
    ("not-json", "train {cfg} data.train={d}/table.tsv", "question_answering reads SQuAD JSON or JSON lines"),
    ("broken-line", "train {cfg} data.train={d}/broken.jsonl", "line 2 is not JSON"),
    ("stride-too-long", "train {cfg} task.stride=32", "task.stride 32 must be less than data.max_length 32"),
    ("eval-bad-file", "eval {final} --data {d}/moved.jsonl", "--data '"),
    ("predict-odd-texts", "predict {final} what?", "give --question Q --context C"),
    ("predict-question-alone", "predict {final} --question what?", "--question and --context go together"),
]


@pytest.fixture(scope="module")
def bad(work):
    tmp, cfg, _ = work
    return bad_input_folder(tmp, cfg, bad_rows())


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(work, bad, case, capfd):
    _, argv, fragment = case
    out, _ = run(work, "single")
    argv = argv.format(cfg=bad / "config.yaml", d=bad / "data", final=out / "final").split()
    assert_one_line_in_process(argv, capfd, fragment, bad, out)
