"""Batches for language modelling from fixed-length token blocks (no padding: every position is a token).

Masking for masked LM is written here rather than taken from transformers' DataCollatorForLanguageModeling
for two reasons: its random stream belongs to the process (so a batch's masks would depend on the worker,
the world size and whether the run was resumed), and its whole-word masking needs character offsets that
packed blocks do not have. Here each block draws from a generator seeded by (seed, epoch, block): a
block gets the same masks in any batch, on any rank, in any worker, before and after a resume.
"""

from __future__ import annotations

import numpy as np
import torch

EVAL_EPOCH = 2**31 - 1  # the "epoch" of evaluation batches: fixed masks, so validation losses compare


def block_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> 1))


class CausalLMCollator:
    """Stack blocks; the targets are the inputs (the loss shifts them by one position)."""

    def __call__(self, items: list[dict]) -> dict:
        ids = torch.stack([it["input_ids"] for it in items])
        return {"input_ids": ids, "labels": ids}


class MaskedLMCollator:
    """BERT's masking: select ``probability`` of the tokens (never special tokens); of those, 80% become
    [MASK], 10% a random token, 10% stay. Targets are -100 except at selected positions.

    ``whole_word``: select words, not tokens; a selected word has all its tokens selected.
    """

    def __init__(self, tokenizer, probability: float = 0.15, whole_word: bool = False, seed: int = 0,
                 epoch: int = 0):
        if tokenizer.mask_token_id is None:
            raise ValueError("masked LM needs a tokenizer with a mask token")
        self.mask_id, self.vocab = tokenizer.mask_token_id, len(tokenizer)
        self.probability, self.whole_word, self.seed, self.epoch = probability, whole_word, seed, epoch
        self.special = torch.zeros(self.vocab, dtype=torch.bool)
        self.special[tokenizer.all_special_ids] = True
        self.continues = continuation_table(tokenizer) if whole_word else None

    def __call__(self, items: list[dict]) -> dict:
        ids = torch.stack([it["input_ids"] for it in items])
        # Three draws per position (select, how to replace, which random token), from each block's own generator.
        draws = [self.draws(it["index"], ids.shape[1]) for it in items]
        pick, roll, random_ids = (torch.stack(d) for d in zip(*draws))
        special = self.special[ids]
        if self.whole_word:
            # A word = a word-start token and the continuation tokens after it. Draw once per word start
            # and spread the draw to the word's tokens (cumsum numbers the words within each row).
            # (A block may begin inside a word: those tokens are word 0, which has no start and is never chosen.)
            start = ~self.continues[ids]
            word = torch.cumsum(start, dim=1)
            draw = (pick < self.probability) & start
            chosen = torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=torch.long).scatter_add_(1, word, draw.long())
            selected = (torch.gather(chosen, 1, word) > 0) & ~special
        else:
            selected = (pick < self.probability) & ~special
        labels = torch.where(selected, ids, torch.full_like(ids, -100))
        inputs = torch.where(selected & (roll < 0.8), torch.full_like(ids, self.mask_id), ids)
        inputs = torch.where(selected & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
        return {"input_ids": inputs, "labels": labels}

    def draws(self, index: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = block_generator(self.seed, self.epoch, index)
        return (torch.rand(length, generator=g), torch.rand(length, generator=g),
                torch.randint(self.vocab, (length,), generator=g))


def continuation_table(tokenizer) -> torch.Tensor:
    """For each token id: does it continue the word before it (rather than start a word)?

    WordPiece marks continuations (``##ing``); byte-level BPE and SentencePiece mark word starts (``Ġthe``,
    ``▁the``). Special tokens always start a word.
    """
    vocab = tokenizer.get_vocab()
    model = tokenizer.backend_tokenizer.model if tokenizer.is_fast else None
    prefix = getattr(model, "continuing_subword_prefix", None) if type(model).__name__ == "WordPiece" else None
    table = torch.zeros(len(tokenizer), dtype=torch.bool)
    starts = ("Ġ", "▁")
    for token, i in vocab.items():
        if i >= len(table):
            continue
        table[i] = token.startswith(prefix) if prefix else not token.startswith(starts)
    table[tokenizer.all_special_ids] = False
    return table
