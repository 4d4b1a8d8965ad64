"""Language modelling on unlabeled text: causal LM (next token, GPT-style) and masked LM (BERT-style).

The corpus is tokenized once into a flat stream on disk and cut into fixed-length blocks (no padding);
a block is one "example" for the sampler, so batches, ranks, accumulation and resume work exactly as
for classification. Loss and perplexity are over exact target-token counts summed over all ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_train.data.collate import CausalLMCollator, MaskedLMCollator
from dist_train.data.corpus import TokenBlocks, read_corpus, tokenize_corpus
from dist_train.data.fingerprint import data_fingerprint
from dist_train.data.new_tokenizer import cached_tokenizer
from dist_train.errors import UserError
from dist_train.tasks.base import Splits, SumEvaluator, Task


def cache_root(cfg) -> str:
    import datasets

    return cfg.data.cache_dir or datasets.config.HF_DATASETS_CACHE


class LanguageModelTask(Task):
    lm_loss = True
    metrics = ("loss", "perplexity")
    lower_is_better = frozenset({"loss", "perplexity"})
    summary = ("loss", "perplexity")
    reads_tables = False
    predict_hint = "use dist-train eval for its perplexity on text"
    separator = ""
    """How documents are joined in the stream: ``eos`` token after each, or the tokenizer's ``special`` tokens."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self._corpora: dict = {}

    def corpus(self, spec, what: str):
        key = str(spec)
        if key not in self._corpora:
            d = self.cfg.data
            self._corpora[key] = read_corpus(spec, d.text_column, d.text_unit, d.cache_dir, what)
        return self._corpora[key]

    def load_tokenizer(self):
        spec = self.cfg.model.train_tokenizer
        if spec.kind is None:
            return super().load_tokenizer()
        self.tokenizer = cached_tokenizer(spec, self.corpus(self.cfg.data.train, "data.train"), cache_root(self.cfg))
        return self.tokenizer

    # -- data ------------------------------------------------------------------------------------------
    def prepare(self, tokenizer) -> Splits:
        self.tokenizer = tokenizer
        d = self.cfg.data
        return self.splits_around(self.split(d.train, "data.train"))

    def hold_out(self, train, fraction: float, seed: int) -> tuple:
        """Whole blocks of the token stream held out."""
        if len(train) < 2:
            raise UserError(f"data.validation_split: data.train has only {len(train)} block of "
                            f"{self.cfg.data.max_length} tokens; nothing to split")
        return train.split(fraction, seed)

    def split(self, spec, what: str):
        """The blocks of a corpus (paths, globs, folders or a list of these)."""
        d = self.cfg.data
        stream = tokenize_corpus(self.corpus(spec, what), self.tokenizer, self.separator, d.num_proc,
                                 cache_root(self.cfg), what)
        found = TokenBlocks(stream, d.max_length)
        if len(found) == 0:
            raise UserError(f"{what}: the corpus has {stream.num_tokens} tokens, fewer than one block of "
                            f"data.max_length={d.max_length}; give more text or lower data.max_length")
        return found

    @staticmethod
    def lengths(ds) -> list[int]:
        return ds.lengths

    @staticmethod
    def fingerprint(ds) -> dict:
        return data_fingerprint(len(ds), ds.stream.fingerprint, ds.blocks)

    @staticmethod
    def view(ds):
        return ds

    def evaluator(self, device, ds=None):
        return SumEvaluator(self, device)

    def export_meta(self) -> dict:
        d = self.cfg.data
        return {**super().export_meta(), "text_column": d.text_column, "text_unit": d.text_unit}


class CausalLMTask(LanguageModelTask):
    name = "causal_lm"
    separator = "eos"
    architectures = ("ForCausalLM", "LMHeadModel")
    peft_task_type = "CAUSAL_LM"
    predict_hint = "use dist-train generate to continue a prompt, or dist-train eval for its perplexity on text"
    can_generate = True

    @torch.no_grad()
    def generate(self, engine, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, batch_size: int) -> list[str]:
        """Each prompt's continuation (the new text only). ``temperature`` 0 is greedy decoding; otherwise
        sampling from the top-p nucleus, seeded: the same seed and prompts give the same text."""
        tok = self.tokenizer
        # Decoder-only models continue from the right end of the prompt: pad on the left, so that every
        # prompt of a batch ends where generation starts; a prompt too long for the positions left keeps its end.
        tok.padding_side = tok.truncation_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        sample = temperature > 0
        options = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id}
        if sample:
            options.update(temperature=temperature, top_p=top_p)
        torch.manual_seed(seed)
        out = []
        for i in range(0, len(prompts), batch_size):
            # A prompt starts after an end-of-text, as every document did in training.
            enc = tok([tok.eos_token + p for p in prompts[i:i + batch_size]], return_tensors="pt", padding=True,
                      truncation=True, max_length=self.cfg.data.max_length)
            enc = {k: v.to(engine.device) for k, v in enc.items()}
            ids = engine.unwrapped.generate(**enc, **options)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return out

    @staticmethod
    def auto_model():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def collator(self, epoch: int):
        return CausalLMCollator()

    def build_model(self):
        from dist_train.model.causal_loss import CausalLMLoss

        model = super().build_model()
        # model.labelled_logits: the output layer projects only the positions with a target, and where the
        # model allows it computes the loss chunk by chunk without the full logits (dist_train/model/causal_loss.py).
        self.lm_loss = CausalLMLoss(model, self.cfg.model.labelled_logits, shift=1)
        return model

    def inputs(self, batch: dict) -> dict:
        loss = getattr(self, "lm_loss", None)
        if loss is not None:
            loss.arm(batch["labels"])  # this batch's forward projects its labelled positions only
        return {"input_ids": batch["input_ids"]}

    @staticmethod
    def count(batch: dict) -> torch.Tensor:
        return Task.count_of(batch["labels"][:, 1:])

    def loss_sum(self, outputs, batch: dict) -> torch.Tensor:
        """Summed next-token cross-entropy: position t predicts token t+1 (the last position has no target)."""
        loss = getattr(self, "lm_loss", None)
        if loss is not None:
            return loss(outputs, batch["labels"])
        logits = outputs.logits
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)  # shift the targets, not the logits (no copy)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100,
                               reduction="sum")


class MaskedLMTask(LanguageModelTask):
    name = "masked_lm"
    separator = "special"
    architectures = ("ForMaskedLM",)

    def load_tokenizer(self):
        tokenizer = super().load_tokenizer()
        if tokenizer.mask_token_id is None:
            raise UserError("task masked_lm: the tokenizer has no mask token; use a BERT-style tokenizer, or "
                            "train one with model.train_tokenizer.kind=wordpiece")
        return tokenizer

    @staticmethod
    def auto_model():
        from transformers import AutoModelForMaskedLM

        return AutoModelForMaskedLM

    def build_model(self):
        from dist_train.model.causal_loss import output_layer

        model = super().build_model()
        # Only the selected ~15% of positions have targets, and for a small model the projection onto the
        # vocabulary is the largest matmul of the step: project just those rows (same loss, same gradients),
        # unless model.labelled_logits=false.
        projection = output_layer(model, self.cfg.model.labelled_logits)
        if projection is not None:
            projection.register_forward_pre_hook(self._only_targets)
        return model

    def _only_targets(self, module, args):
        return (args[0][self._targets],)

    def collator(self, epoch: int):
        t = self.cfg.task
        return MaskedLMCollator(self.tokenizer, t.mlm_probability, t.whole_word_mask, self.cfg.train.seed, epoch)

    def inputs(self, batch: dict) -> dict:
        self._targets = batch["labels"] != -100  # read by the projection hook in this batch's forward
        return {"input_ids": batch["input_ids"]}

    def export_meta(self) -> dict:
        t = self.cfg.task
        return {**super().export_meta(), "mlm_probability": t.mlm_probability, "whole_word_mask": t.whole_word_mask}

    @staticmethod
    def count(batch: dict) -> torch.Tensor:
        return Task.count_of(batch["labels"])

    @staticmethod
    def loss_sum(outputs, batch: dict) -> torch.Tensor:
        """Summed cross-entropy over the masked positions (logits come for those rows only, in order)."""
        logits, labels = outputs.logits, batch["labels"]
        targets = labels[labels != -100] if logits.dim() == 2 else labels.reshape(-1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100,
                               reduction="sum")
