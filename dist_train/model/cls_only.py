"""[CLS]-only last layer: the same logits, loss and gradients for less work.

A sequence-classification head of the BERT family reads position 0 of the last layer alone (BERT's pooler,
RoBERTa's classification head). The last layer must still compute keys and values for every token - position
0 attends to all of them - but its query, attention output and feed-forward are needed for position 0 only:
for all-MiniLM-L6-v2 that is about 10/12 of one layer's matmuls out of six, ~14% of a step's FLOPs.

Nothing changes in the model's parameters or their names: the last layer's ``forward`` is replaced on that
one instance, so checkpoints and exports are the stock architecture. Dropout draws its masks at the stock
model's full shapes (then keeps position 0), so the random stream - and with it every later dropout - is the
one the stock model draws: training is the same computation as the stock model's, dropout on or off (tests:
logits, loss and every gradient within 1e-7 with eager attention and with SDPA on CPU, whose dropout runs
through the same full-matrix mask there). GPU SDPA kernels (flash, memory-efficient) draw the attention
dropout inside the kernel for the whole T x T matrix, which one query row cannot reproduce: on a GPU with
dropout on, the two differ by that draw (the same distribution); with dropout off they agree.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from dist_train.errors import UserError

# Sequence-classification models whose head reads position 0 of the last hidden state only.
FIRST_TOKEN_HEADS = ("BertForSequenceClassification", "RobertaForSequenceClassification",
                     "XLMRobertaForSequenceClassification", "CamembertForSequenceClassification")


def last_layer(model):
    """The last BERT-style encoder layer of ``model``, or None when the model is not of that family."""
    encoder = getattr(model.base_model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not layers:
        return None
    layer = layers[-1]
    ok = all(hasattr(layer, name) for name in ("attention", "intermediate", "output")) and \
        all(hasattr(layer.attention.self, name) for name in ("query", "key", "value"))
    return layer if ok and not getattr(layer, "add_cross_attention", False) else None


def supported(model) -> bool:
    return type(model).__name__ in FIRST_TOKEN_HEADS and last_layer(model) is not None


def apply(model, setting) -> bool:
    """Install the [CLS]-only last layer as ``model.cls_only_last_layer`` says (``auto``: where the model's
    head reads position 0 alone; ``true``: required; ``false``: never); returns whether it is on."""
    if setting is False or (setting == "auto" and not supported(model)):
        return False
    if not supported(model):
        raise UserError(f"model.cls_only_last_layer=true: {type(model).__name__} is not a BERT-family sequence "
                        f"classifier whose head reads [CLS] alone ({', '.join(FIRST_TOKEN_HEADS)}); set it to auto")
    layer = last_layer(model)
    layer.forward = types.MethodType(_first_position_forward, layer)
    return True


def _dropout_first(x: torch.Tensor, full_shape: tuple, p: float, training: bool, dim: int) -> torch.Tensor:
    """Dropout on ``x``, the first position (along ``dim``) of a tensor of ``full_shape``, with the mask the
    stock model would draw for the whole tensor."""
    if not training or p == 0.0:
        return x
    mask = F.dropout(torch.ones(full_shape, dtype=x.dtype, device=x.device), p, True)
    return x * mask.narrow(dim, 0, 1)


def _first_position_forward(layer, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                            *args, **kwargs) -> torch.Tensor:
    """The layer's output at position 0 only, shape (batch, 1, hidden): what the head reads."""
    sa, training = layer.attention.self, layer.training
    batch, length, _ = hidden_states.shape
    heads, size = sa.num_attention_heads, sa.attention_head_size
    first = hidden_states[:, :1]
    query = sa.query(first).view(batch, 1, heads, size).transpose(1, 2)
    key = sa.key(hidden_states).view(batch, length, heads, size).transpose(1, 2)
    value = sa.value(hidden_states).view(batch, length, heads, size).transpose(1, 2)
    scores = torch.matmul(query, key.transpose(2, 3)) * sa.scaling  # (batch, heads, 1, length)
    if attention_mask is not None:
        mask = attention_mask[:, :, :1, :] if attention_mask.dim() == 4 else attention_mask
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = _dropout_first(F.softmax(scores, dim=-1), (batch, heads, length, length), sa.dropout.p, training, 2)
    context = torch.matmul(probs, value).transpose(1, 2).reshape(batch, 1, heads * size)
    out = layer.attention.output
    attended = out.LayerNorm(_dropout_first(out.dense(context), (batch, length, context.shape[-1]),
                                            out.dropout.p, training, 1) + first)
    ff = layer.output
    hidden = ff.dense(layer.intermediate(attended))
    return ff.LayerNorm(_dropout_first(hidden, (batch, length, hidden.shape[-1]), ff.dropout.p, training, 1)
                        + attended)
