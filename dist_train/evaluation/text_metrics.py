"""Scores of generated text against references: BLEU and chrF (sacrebleu), ROUGE-1/2/L (rouge-score),
exact match and token F1 with SQuAD's normalisation.

Corpus metrics (BLEU, chrF) are not averages of per-example scores: they need every hypothesis at once,
so the caller gathers all of them first (``dist_train/tasks/text_to_text.py``), and the same N examples give
the same numbers on any number of processes.
"""

from __future__ import annotations

import collections
import re
import string

FAMILIES = {"bleu": ("bleu",), "chrf": ("chrf",), "rouge": ("rouge1", "rouge2", "rougeL"),
            "squad": ("exact_match", "f1")}
"""``task.generation_metrics`` values and the report keys each gives (all on a 0-100 scale)."""


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation (its official evaluation script): lower case, no punctuation, no articles
    (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of one prediction against one reference (after ``normalize_answer``)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """Exact match and F1 in percent, each example scored against its best reference, averaged over examples."""
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    em = [max(float(normalize_answer(p) == normalize_answer(r)) for r in refs) for p, refs in zip(predictions, references)]
    f1 = [max(token_f1(p, r) for r in refs) for p, refs in zip(predictions, references)]
    return {"exact_match": 100 * sum(em) / len(em), "f1": 100 * sum(f1) / len(f1)}


def generation_scores(hypotheses: list[str], references: list[str], families: list[str]) -> dict:
    """The report keys of ``families`` (see FAMILIES) for ``hypotheses`` against one reference each."""
    report: dict = {}
    if "bleu" in families or "chrf" in families:
        import sacrebleu

        if "bleu" in families:
            report["bleu"] = sacrebleu.corpus_bleu(hypotheses, [references]).score
        if "chrf" in families:
            report["chrf"] = sacrebleu.corpus_chrf(hypotheses, [references]).score
    if "rouge" in families:
        from rouge_score import rouge_scorer

        keys = FAMILIES["rouge"]
        scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
        totals = dict.fromkeys(keys, 0.0)
        for hyp, ref in zip(hypotheses, references):
            for key, score in scorer.score(ref, hyp).items():
                totals[key] += score.fmeasure
        report.update({k: 100 * v / max(len(hypotheses), 1) for k, v in totals.items()})
    if "squad" in families:
        report.update(squad_scores(hypotheses, [[r] for r in references]))
    return report
