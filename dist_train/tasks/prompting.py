"""Classification without training, by prompting a causal language model: which label word is more likely
right after a template that holds the text (``dist-train zero-shot`` on a classification config).

The raw answer carries the label words' prior (a base model may say "positive" after nearly any review), so
the report also gives contextual calibration (Zhao et al., 2021, "Calibrate Before Use"): the label words'
probabilities after content-free inputs ("N/A", "", "[MASK]" in place of the text), averaged and
normalised, are divided out before the argmax.
"""

from __future__ import annotations

import torch

from dist_train.errors import UserError

CONTENT_FREE = ("N/A", "", "[MASK]")


def joined(prompt: str, target: str) -> str:
    """The prompt and what follows it as one text: a space between them unless the prompt ends in whitespace
    (so a template ending in ``French:`` is followed by `` Au commencement``, as text would be)."""
    return prompt + target if not prompt or prompt[-1].isspace() or target[:1].isspace() else f"{prompt} {target}"


def fill(template: str, text: str) -> str:
    return template.replace("{source}", text)


def label_token_ids(tokenizer, template: str, words: list[str]) -> list[int]:
    """The first token of each label word as it follows a filled template; distinct, or a UserError."""
    prompt = fill(template, "x")
    base = tokenizer(prompt)["input_ids"]
    ids = []
    for word in words:
        full = tokenizer(joined(prompt, word))["input_ids"]
        ids.append(full[len(base)] if full[:len(base)] == base and len(full) > len(base) else
                   tokenizer(" " + word, add_special_tokens=False)["input_ids"][0])
    shared = {w for w, i in zip(words, ids) if ids.count(i) > 1}
    if shared:
        raise UserError(f"task.label_words {sorted(shared)} begin with the same token; choose words that differ in "
                        "their first token")
    return ids


@torch.no_grad()
@torch.no_grad()
def label_log_probs(engine, tokenizer, prompts: list[str], token_ids: list[int], batch_size: int) -> torch.Tensor:
    """(prompts x label words) log-probabilities of each label word's first token right after each prompt,
    from the causal LM that ``engine`` runs (on its device, in its precision); on the CPU."""
    tokenizer.padding_side = "left"  # the next token is read at the last position of every row
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
        logits = engine.forward(**{k: v.to(engine.device) for k, v in enc.items()}, logits_to_keep=1).logits
        out.append(torch.log_softmax(logits[:, -1].float(), dim=-1)[:, token_ids].cpu())
    return torch.cat(out)


def scores_report(predicted: torch.Tensor, gold: list[int], names: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    pred = predicted.tolist()
    return {"accuracy": float(accuracy_score(gold, pred)),
            "f1_macro": float(f1_score(gold, pred, average="macro", labels=list(range(len(names))), zero_division=0)),
            "predicted_share": {n: pred.count(i) / max(len(pred), 1) for i, n in enumerate(names)}}


def zero_shot_classification(engine, tokenizer, template: str, words: list[str], texts: list[str], gold: list[int],
                             names: list[str], batch_size: int) -> dict:
    """Accuracy and macro F1 of the raw and the calibrated answers, and the content-free probabilities."""
    ids = label_token_ids(tokenizer, template, words)
    scores = label_log_probs(engine, tokenizer, [fill(template, t) for t in texts], ids, batch_size)
    free = label_log_probs(engine, tokenizer, [fill(template, t) for t in CONTENT_FREE], ids, batch_size).exp()
    prior = (free / free.sum(dim=1, keepdim=True)).mean(dim=0)
    calibrated = scores - prior.log()
    return {"n": len(texts), **scores_report(scores.argmax(dim=1), gold, names),
            "calibrated": scores_report(calibrated.argmax(dim=1), gold, names),
            "content_free_probabilities": {n: float(p) for n, p in zip(names, prior)},
            "label_words": dict(zip(names, words))}
