"""The README's measured numbers are the stored results they come from (bench/results/*.json), rounded as
written: a rerun of a benchmark that changes a number fails here until the README says the new one."""

from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def result(name: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())


def row(start: str) -> str:
    (line,) = [x for x in README.splitlines() if x.startswith(f"| {start}")]
    return line


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60)} s"


CASES = [  # (README row, the figure as written, the stored value, decimals)
    ("the headline job", "test accuracy **{}**", lambda: result("job_vs_trainer")["runs"]["dist_train"][0]["test_accuracy"], 3),
    ("the headline job", "{} for the whole command", lambda: minutes(result("job_vs_trainer")["median_wall_s"]["dist_train"]), None),
    ("English to French", "chrF {}", lambda: result("llm_tasks")["arms"]["translate_lora_1000"]["report"]["chrf"], 1),
    ("English to French", "zero-shot {}", lambda: result("llm_tasks")["arms"]["translate_zero_shot"]["report"]["chrf"], 1),
    ("English to French", "3-shot {}", lambda: result("llm_tasks")["arms"]["translate_3_shot"]["report"]["chrf"], 1),
    ("a 3-layer student", "accuracy {}", lambda: result("distill")["table"]["s3_distill"]["test_accuracy"], 3),
    ("a 3-layer student", "at {}x", lambda: result("distill")["table"]["s3_distill"]["speed_vs_teacher"], 1),
    ("fine-tuning speed", "{}x Trainer's", lambda: result("finetune_vs_hf")["ratios"]["dist_train/trainer_grouped"], 2),
    ("fine-tuning speed", "/ {}x TRL's", lambda: result("sft_vs_trl")["ratios"]["dist_train/trl_best"]["target_tokens_per_s"], 2),
    ("fine-tuning speed", "({}x its memory)", lambda: result("sft_vs_trl")["ratios"]["dist_train/trl_best"]["peak_memory"], 2),
    ("prediction", "| {}x;", lambda: result("predict")["ratios"]["dist_train/pipeline"], 2),
    ("prediction", "int8 ONNX {}x", lambda: result("predict")["ratios"]["onnx_int8/dist_train"], 2),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_readme_numbers_are_the_stored_results(case):
    start, written, stored, decimals = case
    line = row(start)
    figure = stored() if decimals is None else f"{stored():.{decimals}f}"
    assert written.format(figure) in line, (written.format(figure), line)


def test_stored_results_hold_no_machine_paths():
    for path in (ROOT / "bench" / "results").glob("*.json"):
        text = path.read_text()
        assert not re.search(r'"/(work|tmp|home|root|Users)/', text), path.name
