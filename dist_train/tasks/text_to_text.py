"""Text to text: a source text in, a target text out (translation, summarisation, answers in words).

Two kinds of model learn it from the same config:
- decoder-only (any ``AutoModelForCausalLM``: Gemma, Llama, GPT-2, a dist-train causal-LM export) reads
  ``prompt + target + EOS`` as one sequence; only the target tokens (and EOS) carry a loss, the prompt's are
  -100. The prompt is ``task.template`` with the row's source in place of ``{source}`` (optionally in the
  tokenizer's chat template).
- encoder-decoder (``AutoModelForSeq2SeqLM``: T5, BART, Marian) reads the prompt in its encoder and learns
  the target as decoder labels.

Validation reports the loss over every target token and, for the first ``task.validation_generations``
examples, the scores of generated text (``task.generation_metrics``): greedy or beam search, batched with
left padding for decoder-only models, sharded over the ranks and gathered, so a corpus metric over N
examples is the same on any number of processes. The test split and ``dist-train eval`` generate for every
example. ``task.few_shot`` places k training pairs before every prompt at generation (an in-context
baseline); ``dist-train zero-shot`` evaluates a model through this same path without training it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from dist_train.data.fingerprint import data_fingerprint
from dist_train.data.sampler import eval_plan
from dist_train.data.sources import check_texts, read_table, require_columns
from dist_train.errors import UserError
from dist_train.model.assemble import build_model
from dist_train.model.files import first_line, resolve_model_path
from dist_train.tasks.prompting import joined
from dist_train.tasks.base import Splits, SumEvaluator, Task
from dist_train.evaluation.text_metrics import FAMILIES, generation_scores

SHOT_SEPARATOR = "\n\n"  # between the in-context examples of a few-shot prompt, and before the query


def model_kind(model_cfg) -> str:
    """``causal`` (decoder-only) or ``seq2seq`` (encoder-decoder), from the model's config; an encoder-only
    model (BERT) or a model type transformers does not know is a UserError."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    if model_cfg.pretrained is not None:
        path = resolve_model_path(model_cfg.pretrained)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - an unknown model type, a damaged config.json: one line each
            raise UserError(f"model.pretrained: transformers cannot read the model in '{path}': "
                            f"{first_line(exc)[:300]}") from None
        model_type, encoder_decoder = config.model_type, bool(getattr(config, "is_encoder_decoder", False))
    else:
        kwargs = dict(model_cfg.config)
        model_type = kwargs.pop("model_type")
        try:
            encoder_decoder = bool(AutoConfig.for_model(model_type, **kwargs).is_encoder_decoder)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"model.config: {first_line(exc)[:300]}") from None
    if encoder_decoder:
        return "seq2seq"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "causal"
    raise UserError(f"task text_to_text: a {model_type} model is encoder-only and cannot generate text; use a "
                    "decoder-only model (Gemma, Llama, GPT-2, a causal_lm export) or an encoder-decoder model "
                    "(T5, BART)")


class TextToTextAuto:
    """The transformers auto class for a text-to-text model folder or config: AutoModelForSeq2SeqLM for an
    encoder-decoder model, else AutoModelForCausalLM (export and ``from_pretrained`` go through this)."""

    @staticmethod
    def _auto(config):
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        from transformers import AutoConfig

        config = kwargs.get("config") or AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get(
            "trust_remote_code", False))
        return cls._auto(config).from_pretrained(path, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        return cls._auto(config).from_config(config, **kwargs)


class TextToTextTask(Task):
    name = "text_to_text"
    metrics = ("loss", "perplexity", *(key for keys in FAMILIES.values() for key in keys))
    lower_is_better = frozenset({"loss", "perplexity"})
    architectures = ()  # a causal LM folder is causal_lm's unless dist_train.json says text_to_text
    peft_task_type = "CAUSAL_LM"  # SEQ_2_SEQ_LM for encoder-decoder models (build_model)
    can_predict = True
    can_generate = True
    generates_text = True
    lm_loss = True
    can_pack = True
    task_fields = frozenset({"template", "chat_template", "few_shot", "generation_metrics", "validation_generations",
                             "max_new_tokens", "num_beams", "stop_at_newline"})

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kind = None  # causal | seq2seq, read from the model's config when the model is first needed
        self.shots: list[tuple[str, str]] = []
        self.generations: list[dict] | None = None
        self.summary = ("loss", *(k for f in cfg.task.generation_metrics for k in FAMILIES[f]))

    # -- config ------------------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg) -> None:
        t, d = cfg.task, cfg.data
        if d.packing and cls.kind_of(cfg) != "causal":
            raise UserError("config: data.packing packs decoder-only models' examples; an encoder-decoder model "
                            "reads its source and target apart: set data.packing=false")
        if t.template is not None and "{source}" not in t.template:
            raise UserError(f"config: task.template must contain {{source}} where each row's source text goes, got "
                            f"{t.template[:80]!r}")
        if d.text_pair_column:
            raise UserError("config: data.text_pair_column: text_to_text reads one source column "
                            "(data.text_column) and one target column (data.target_column); remove it")
        if d.target_column == d.text_column:
            raise UserError(f"config: data.text_column and data.target_column are both '{d.text_column}'; each "
                            "names a different column")
        metric = cfg.checkpoint.metric
        produced = {k for f in t.generation_metrics for k in FAMILIES[f]}
        if metric in {k for keys in FAMILIES.values() for k in keys} and metric not in produced:
            family = next(f for f, keys in FAMILIES.items() if metric in keys)
            raise UserError(f"config: checkpoint.metric {metric} needs generated text: add {family} to "
                            f"task.generation_metrics (and task.validation_generations > 0)")
        if metric in produced and t.validation_generations == 0:
            raise UserError(f"config: checkpoint.metric {metric} is scored on generated text, but "
                            "task.validation_generations is 0; set it > 0")
        cls.kind_of(cfg)

    @staticmethod
    def kind_of(cfg) -> str:
        return model_kind(cfg.model)

    # -- data ------------------------------------------------------------------------------------------
    def load_tokenizer(self):
        tok = super().load_tokenizer()
        self.kind = self.kind or self.kind_of(self.cfg)
        if self.cfg.task.chat_template and not getattr(tok, "chat_template", None):
            raise UserError("config: task.chat_template=true, but the tokenizer has no chat template; set it "
                            "false (task.template alone builds the prompt)")
        if self.kind == "causal" and tok.eos_token_id is None:
            raise UserError("task text_to_text: the tokenizer has no end-of-text token to end each target with; "
                            "use the model's own tokenizer")
        return tok

    def read(self, path: str, what: str):
        d = self.cfg.data
        ds = read_table(path, d.cache_dir)
        require_columns(ds, path, {"data.text_column": d.text_column, "data.target_column": d.target_column})
        check_texts(ds, path, d.text_column)
        check_texts(ds, path, d.target_column)
        return ds

    def prepare(self, tokenizer) -> Splits:
        self.tokenizer = tokenizer
        d = self.cfg.data
        if not isinstance(d.train, str):
            raise UserError("data.train: text_to_text reads one training file; give one path, not a list")
        rows = self.read(d.train, "data.train")
        self._pick_shots(rows)
        train = self._tokenize(rows)
        return self.splits_around(train)

    def split(self, path, what: str):
        return self._tokenize(self.read(path, what))

    def _pick_shots(self, rows) -> None:
        """``task.few_shot`` training pairs, drawn once with ``data.split_seed``: the same for every prompt."""
        k = self.cfg.task.few_shot
        if k > len(rows):
            raise UserError(f"task.few_shot={k}: data.train has only {len(rows)} rows")
        picks = sorted(random.Random(self.cfg.data.split_seed).sample(range(len(rows)), k))
        d = self.cfg.data
        self.shots = [(rows[i][d.text_column], rows[i][d.target_column]) for i in picks]

    def prompt_text(self, source: str, shots: bool = True) -> str:
        """The text the model reads before the target: the template around the source, after the few-shot
        examples (at generation only), in the tokenizer's chat template when asked."""
        t = self.cfg.task
        template = t.template if t.template is not None else ("{source}\n" if self.kind == "causal" else "{source}")
        text = template.replace("{source}", source)
        if shots and self.shots:
            text = "".join(joined(template.replace("{source}", s), target) + SHOT_SEPARATOR
                           for s, target in self.shots) + text
        if t.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # A chat template writes its own special tokens (BOS) into the text.
        ids = self.tokenizer(texts, add_special_tokens=not self.cfg.task.chat_template)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return [x[:-1] if self.kind == "causal" and x and x[-1] == eos else x for x in ids]  # tokenizers that append EOS

    def prompt_ids(self, sources: list[str], shots: bool = True) -> list[list[int]]:
        """Token ids of each source's prompt, at most ``data.max_length`` (a longer one keeps its end: the
        instruction before the answer; decoder-only models keep their first token, BOS, too)."""
        limit = self.cfg.data.max_length
        ids = self._encode([self.prompt_text(s, shots) for s in sources])
        if self.kind == "seq2seq":
            return [x[:limit - 1] + x[-1:] if len(x) > limit else x for x in ids]
        return [x[:1] + x[len(x) - limit + 1:] if len(x) > limit else x for x in ids]

    def _tokenize(self, rows):
        d = self.cfg.data
        limit, tok = d.max_length, self.tokenizer
        src, tgt = d.text_column, d.target_column

        def encode_causal(batch):
            prompts = self._encode([self.prompt_text(s, shots=False) for s in batch[src]])
            fulls = self._encode([joined(self.prompt_text(s, shots=False), t) for s, t in zip(batch[src], batch[tgt])])
            out = {"input_ids": [], "labels": [], "length": []}
            for prompt, full, target_text in zip(prompts, fulls, batch[tgt]):
                # The target's tokens as they come after the prompt in one text (a tokenizer may merge across
                # the boundary: then the target is tokenized on its own).
                target = full[len(prompt):] if full[:len(prompt)] == prompt else tok(
                    target_text, add_special_tokens=False)["input_ids"]
                prompt, target = fit(prompt, target + [tok.eos_token_id], limit)
                out["input_ids"].append(prompt + target)
                out["labels"].append([-100] * len(prompt) + target)
                out["length"].append(len(prompt) + len(target))
            return out

        def encode_seq2seq(batch):
            prompts = self.prompt_ids(batch[src], shots=False)
            targets = tok(text_target=batch[tgt], truncation=True, max_length=limit)["input_ids"]
            # The decoder learns to stop: its targets end with EOS (T5's and BART's tokenizers add it already).
            eos = tok.eos_token_id
            targets = [t if not t or t[-1] == eos else t[:limit - 1] + [eos] for t in targets]
            return {"input_ids": prompts, "labels": targets,
                    "length": [len(p) + len(t) for p, t in zip(prompts, targets)]}

        encode = encode_causal if self.kind == "causal" else encode_seq2seq
        ds = rows.map(encode, batched=True, batch_size=1000, remove_columns=[c for c in rows.column_names
                                                                             if c not in (src, tgt)])
        return ds.rename_columns({src: "source", tgt: "reference"}) if (src, tgt) != ("source", "reference") else ds

    def train_subset(self, ds):
        """The training set as trained on: ``data.train_rows`` of it, then packed with ``data.packing``."""
        ds = super().train_subset(ds)
        if not self.cfg.data.packing:
            return ds
        from dist_train.data.packing import pack

        packed, fill = pack(ds, self.cfg.data.max_length)
        if self.is_main:
            print(f"dist-train: packing: {len(ds)} training examples in {len(packed)} rows of up to "
                  f"{self.cfg.data.max_length} tokens, {100 * fill:.1f}% of their positions filled", flush=True)
        return packed

    def lengths(self, ds) -> list[int]:
        return ds["length"]

    def fingerprint(self, ds) -> dict:
        labels = ds["labels"]  # per row: how many target tokens, and the sum of their ids
        return data_fingerprint(len(ds), ds["length"], [sum(t >= 0 for t in x) for x in labels],
                                [sum(t for t in x if t >= 0) for x in labels])

    def view(self, ds):
        return ds.select_columns([c for c in ("input_ids", "labels", "position_ids") if c in ds.column_names])

    def collator(self, epoch: int):
        return TextToTextCollator(self.tokenizer.pad_token_id, self.decoder_start if self.kind == "seq2seq" else None)

    # -- model -----------------------------------------------------------------------------------------
    @staticmethod
    def auto_model():
        return TextToTextAuto

    def build_model(self):
        self.kind = self.kind or self.kind_of(self.cfg)
        peft_type = "SEQ_2_SEQ_LM" if self.kind == "seq2seq" else "CAUSAL_LM"
        model = build_model(self.cfg.model, TextToTextAuto, self.tokenizer, self.cfg.data.max_length,
                            peft_task_type=peft_type)
        config = model.config
        self.decoder_start = getattr(config, "decoder_start_token_id", None)
        if self.kind == "seq2seq" and self.decoder_start is None:
            raise UserError("task text_to_text: the encoder-decoder model's config has no decoder_start_token_id")
        self.loss = causal_loss(model, self.cfg.model, shift=1 if self.kind == "causal" else 0)
        return model

    # -- the step ----------------------------------------------------------------------------------------
    def inputs(self, batch: dict) -> dict:
        self.loss.arm(batch["labels"])
        # No key/value cache in training: it is never read, and with one transformers would not read packed
        # rows' position ids as example boundaries.
        return {**{k: v for k, v in batch.items() if k != "labels"}, "use_cache": False}

    def count(self, batch: dict) -> torch.Tensor:
        labels = batch["labels"]
        return Task.count_of(labels[:, 1:] if self.kind == "causal" else labels)

    def loss_sum(self, outputs, batch: dict) -> torch.Tensor:
        """Summed cross-entropy over the target tokens (decoder-only: position t predicts token t+1)."""
        return self.loss(outputs, batch["labels"])

    def evaluator(self, device, ds=None):
        return SumEvaluator(self, device)

    # -- generation ------------------------------------------------------------------------------------
    def generation_report(self, engine, ds, what: str, batch_size: int) -> dict:
        """Scores of text generated for ``ds``'s examples (validation: its first
        ``task.validation_generations``; any other split: all), the same on every rank."""
        t = self.cfg.task
        if not t.generation_metrics:
            return {}
        n = min(len(ds), t.validation_generations) if what == "validation" else len(ds)
        if n == 0:
            return {}
        sources, references = ds["source"][:n], ds["reference"][:n]
        hypotheses = self.generate_ids(engine, self.prompt_ids(sources), batch_size, greedy=True)
        self.generations = [{"source": s, "reference": r, "hypothesis": h}
                            for s, r, h in zip(sources, references, hypotheses)]
        return {"generated": n, **generation_scores(hypotheses, references, t.generation_metrics)}

    def save_eval_outputs(self, path: Path) -> None:
        """The sources, references and hypotheses of the last generation, one JSON object per line."""
        if self.generations is None:
            return
        with open(path, "w", encoding="utf-8") as fh:
            for row in self.generations:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    @torch.no_grad()
    def generate_ids(self, engine, prompts: list[list[int]], batch_size: int, greedy: bool = True,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     max_new_tokens: int | None = None) -> list[str]:
        """The text generated after each prompt (token ids), on every rank alike.

        Prompts are sorted by length and dealt to the ranks in batches (every rank runs as many batches,
        fillers included, so that sharded engines gather parameters together); each rank writes its
        tokens into its rows of one table, and a sum over the ranks gives every rank the whole table."""
        t, tok = self.cfg.task, self.tokenizer
        new = max_new_tokens or t.max_new_tokens
        width = new + 1  # an encoder-decoder model's output starts with its decoder start token
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        table = torch.full((len(prompts), width), 0, dtype=torch.float64, device=engine.device)
        plan = eval_plan([len(p) for p in prompts], batch_size, engine.rank, engine.world_size)
        options = {"max_new_tokens": new, "num_beams": t.num_beams, "pad_token_id": pad,
                   "synced_gpus": engine.world_size > 1, "do_sample": not greedy}
        if t.stop_at_newline:  # each row stops at its first line break (the rest would be cut anyway)
            options.update(stop_strings=["\n"], tokenizer=tok)
        if not greedy:
            options.update(temperature=temperature, top_p=top_p, top_k=None)
            torch.manual_seed(seed)
        else:  # a model's generation_config may ask for sampling: greedy here means greedy
            options.update(temperature=None, top_p=None, top_k=None)
        was_training = engine.model.training
        engine.train(False)
        for rows, weight in plan:
            batch = [prompts[i] for i in rows]
            longest = max(len(p) for p in batch)
            # Decoder-only models continue from the right end of each prompt: pad on the left.
            left = self.kind == "causal"
            ids = torch.tensor([[pad] * (longest - len(p)) + p if left else p + [pad] * (longest - len(p))
                                for p in batch], device=engine.device)
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) if left else [1] * len(p) + [0] * (longest - len(p))
                                 for p in batch], device=engine.device)
            with engine.autocast():
                out = engine.unwrapped.generate(input_ids=ids, attention_mask=mask, **options)
            out = out[:, longest:] if left else out
            if weight:
                filled = torch.full((len(rows), width), pad, dtype=torch.float64, device=engine.device)
                filled[:, :out.shape[1]] = out[:, :width].double()
                table[rows] = filled
        engine.train(was_training)
        table = engine.all_reduce_sum(table).long().cpu().tolist()
        texts = tok.batch_decode(table, skip_special_tokens=True)
        if t.stop_at_newline:
            texts = [text.strip().split("\n", 1)[0] for text in texts]
        return [text.strip() for text in texts]

    def generate(self, engine, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, batch_size: int) -> list[str]:
        """``dist-train generate``: each prompt (a source) through the template, then sampled or greedy."""
        return self.generate_ids(engine, self.prompt_ids(prompts), batch_size, greedy=temperature == 0,
                                 temperature=temperature, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens)

    @staticmethod
    def generated_line(prompt: str, text: str) -> str:
        """The source, a tab, and the generated target (each on one line)."""
        return f"{' '.join(prompt.split())}\t{' '.join(text.split())}"

    def predict(self, engine, texts: list[str], pairs: list[str] | None, batch_size: int) -> list[dict]:
        return [{"generated": g} for g in self.generate_ids(engine, self.prompt_ids(texts), batch_size)]

    def format_prediction(self, text: str, prediction: dict) -> str:
        return f"{text}\t{prediction['generated']}"

    def prediction_columns(self, prediction: dict) -> dict[str, str]:
        return {"prediction": " ".join(prediction["generated"].split())}

    def zero_shot(self, engine, split: str) -> dict:
        """The untrained model through the same evaluation as training's (k-shot: ``task.few_shot``)."""
        from dist_train.evaluation.loop import evaluate

        self.cfg.model.lora = None  # the model as it is (adapters would start as a no-op anyway)
        self.load_tokenizer()
        splits = self.prepare(self.tokenizer)  # train too: k-shot prompts draw their examples from it
        engine.prepare(self.build_model())
        engine.train(False)
        return evaluate(engine, self, getattr(splits, split), self.cfg.train.eval_batch_size, split)

    # -- export and use --------------------------------------------------------------------------------
    def export_meta(self) -> dict:
        d, t = self.cfg.data, self.cfg.task
        return {**super().export_meta(), "text_column": d.text_column, "target_column": d.target_column,
                "template": t.template, "chat_template": t.chat_template, "few_shot": t.few_shot,
                "shots": self.shots, "generation_metrics": list(t.generation_metrics),
                "max_new_tokens": t.max_new_tokens, "num_beams": t.num_beams, "stop_at_newline": t.stop_at_newline}

    def restore(self, folder: str) -> None:
        from dist_train.use.export import read_meta

        self.shots = [tuple(pair) for pair in read_meta(folder).get("shots") or []]


def fit(prompt: list[int], target: list[int], limit: int) -> tuple[list[int], list[int]]:
    """Cut an example to ``limit`` tokens: the target keeps at least a quarter of them (less only if it is
    shorter), the prompt loses its start first (keeping its first token, BOS, and its end: the instruction)."""
    if len(prompt) + len(target) <= limit:
        return prompt, target
    target = target[:max(limit - len(prompt), limit // 4)]
    room = limit - len(target)
    return (prompt[:1] + prompt[len(prompt) - room + 1:] if room > 1 else prompt[:room]), target


class TextToTextCollator:
    """Right-pads input ids (pad id) and labels (-100); an encoder-decoder model also gets its decoder inputs:
    the labels shifted right behind the decoder start token (pad where the labels are -100)."""

    def __init__(self, pad_id: int, decoder_start: int | None):
        self.pad_id, self.decoder_start = pad_id, decoder_start

    def __call__(self, items: list[dict]) -> dict:
        if "position_ids" in items[0]:
            return self.packed(items)
        longest = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for i, it in enumerate(items):
            ids[i, :len(it["input_ids"])] = torch.as_tensor(it["input_ids"])
            mask[i, :len(it["input_ids"])] = 1
        width = max(len(it["labels"]) for it in items)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for i, it in enumerate(items):
            labels[i, :len(it["labels"])] = torch.as_tensor(it["labels"])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.decoder_start is not None:
            dec = torch.cat([torch.full((len(items), 1), self.decoder_start), labels[:, :-1]], dim=1)
            batch["decoder_input_ids"] = dec.masked_fill(dec == -100, self.pad_id)
        return batch

    def packed(self, items: list[dict]) -> dict:
        """Packed rows: no attention mask (the position ids mark the examples); a row's padding is one more
        example of its own, with no labels."""
        longest = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), longest), -100, dtype=torch.long)
        positions = torch.arange(longest).repeat(len(items), 1)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n], labels[i, :n] = torch.as_tensor(it["input_ids"]), torch.as_tensor(it["labels"])
            positions[i, :n] = torch.as_tensor(it["position_ids"])
            positions[i, n:] = torch.arange(longest - n)
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


def causal_loss(model, model_cfg, shift: int):
    from dist_train.model.causal_loss import CausalLMLoss

    return CausalLMLoss(model, model_cfg.labelled_logits, shift=shift)
