"""Logits only at labelled positions: the language-model loss without the full logits tensor.

A causal LM's loss reads the logits of the positions that have a target, yet the model projects every
position onto the vocabulary: for a 270M Gemma 3 (262,144 tokens) a batch of 8 x 128 tokens makes a
1,024 x 262,144 fp32 logits tensor (1 GiB, twice with its gradient) and the output layer is ~3/4 of a
fine-tuning step, although in supervised fine-tuning only the answer tokens carry a loss.

``CausalLMLoss`` changes what the output layer (``model.get_output_embeddings()``) computes, inside its own
forward call, so that every engine (single, DDP, DeepSpeed ZeRO-3, FSDP2: they gather a module's parameters
only around its forward and backward) and peft's LoRA wrapper see an ordinary forward of the model:

- ``gather``: a forward pre-hook replaces the layer's input (B, T, H) by the rows of the labelled positions
  (N, H), so the model returns logits (N, V) and the loss is ``F.cross_entropy`` over them. Exact for any
  model, also one that post-processes its logits elementwise (Gemma 2's ``final_logit_softcapping``, BART's
  ``+ final_logits_bias``).
- ``chunked``: for models whose forward returns the output layer's result untouched (``CHUNKED`` below,
  checked by reading their forward in transformers), and a plain ``nn.Linear`` output layer, the layer's
  forward computes the SUMMED cross-entropy of those rows chunk by chunk and returns it (a 0-d tensor) in
  place of the logits: the (N, V) tensor never exists. The gradients of the rows, the weight (only when it
  trains: under LoRA the tied embedding is frozen) and the bias are computed chunk by chunk in the forward
  (Liger-Kernel's fused linear cross-entropy): the same three matmuls as the stock step. In fp16 the
  gradient must be scaled by the loss scale before it is rounded to fp16 (softmax values ~1/V underflow),
  so there the backward recomputes each chunk's logits with the scale it is given (one more matmul).

Both are armed per forward call (``arm(labels)`` just before it) and disarmed by that call: an un-armed
forward (``model.generate``, an evaluation that wants logits) passes through untouched. Nothing is
registered as a parameter or buffer and the hooks are not saved: checkpoints and exports are the stock
architecture. ``shift``: 1 for causal LMs (position t predicts labels[:, t+1]); 0 for encoder-decoder
models (decoder position t predicts labels[:, t]).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from dist_train.errors import UserError

IGNORE = -100

# Models whose forward returns ``self.lm_head(hidden_states)`` as ``logits`` with nothing applied to it (read
# in transformers 5.25: gpt2, llama, gemma, gemma2/gemma3 without softcapping, qwen2, qwen3, mistral, phi3,
# gpt_neox, opt (``.contiguous()``: a no-op on a 0-d tensor), smollm3, olmo2, t5). Not: Granite (``logits /
# logits_scaling``), Cohere (``* logit_scale``), BART (``+ final_logits_bias``), Gemma 2/3 with
# ``final_logit_softcapping`` set: those run in gather mode.
CHUNKED = frozenset({
    "GPT2LMHeadModel", "LlamaForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
    "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM", "GPTNeoXForCausalLM",
    "OPTForCausalLM", "SmolLM3ForCausalLM", "Olmo2ForCausalLM", "T5ForConditionalGeneration",
})

# One chunk's logits hold at most this many elements: 2**26 = 64M, 256 MiB in fp32 (plus its bf16 matmul
# result under autocast), against 1 GiB for the whole 1,024 x 262,144 batch above. Rows per chunk =
# MAX_CHUNK_LOGITS // vocabulary: 256 for Gemma 3's 262,144 tokens, 1,335 for GPT-2's 50,257 (so a
# 50k-vocabulary batch of 8 x 128 is one chunk). 256 rows per chunk still keeps a GPU's matmul near its
# compute bound (each chunk reads the whole weight once).
MAX_CHUNK_LOGITS = 2 ** 26


def base_model(model):
    """The transformers model inside a peft wrapper (or ``model`` itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def chunkable(model, head) -> bool:
    """Whether ``model``'s forward returns ``head``'s output as its logits untouched and ``head`` is a plain
    linear layer (not a LoRA layer, not a module whose forward someone replaced)."""
    base = base_model(model)
    return (type(base).__name__ in CHUNKED and getattr(base.config, "final_logit_softcapping", None) is None
            and type(head) is torch.nn.Linear and "forward" not in vars(head))


def output_layer(model, setting):
    """``model``'s output layer (the projection onto the vocabulary) where ``model.labelled_logits`` =
    ``setting`` applies, else None; ``true`` where it cannot apply is an error. It applies to a layer that
    is called once on the hidden states of every position: a module with a (vocabulary, hidden) weight."""
    if setting not in (True, False, "auto"):
        raise UserError(f"model.labelled_logits must be true, false or auto, got {setting!r}")
    if setting is False:
        return None
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if isinstance(head, torch.nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return head
    if setting is True:
        what = "none" if head is None else type(head).__name__
        raise UserError(f"model.labelled_logits=true: {type(base_model(model)).__name__} has no output layer that "
                        f"projects each position onto the vocabulary (get_output_embeddings(): {what}); set "
                        "model.labelled_logits=auto")
    return None


class CausalLMLoss:
    """The summed cross-entropy of a language model over its labelled positions, computed only there.

    ``setting`` (``model.labelled_logits``): ``True`` (required: an error where it cannot apply), ``False``
    (off: full logits), ``"auto"`` (wherever it applies). ``mode`` says what runs: ``off``, ``gather`` or
    ``chunked``. ``chunk_rows`` overrides the rows per chunk (tests force several chunks).
    """

    def __init__(self, model, setting, shift: int = 1, chunk_rows: int | None = None):
        self.shift = shift
        self.mode = "off"
        self.recompute = False
        """Chunked mode: recompute each chunk's logits in backward (always in fp16; tests force it)."""
        self._armed = None  # (rows to keep (B, T) bool, targets (N,)) for the next output-layer call
        self._targets = None  # the armed batch's targets, for __call__
        head = output_layer(model, setting)
        if head is None:
            return
        self.mode = "chunked" if chunkable(model, head) else "gather"
        head.register_forward_pre_hook(self._gather)
        if self.mode == "chunked":
            self.chunk_rows = chunk_rows or max(1, MAX_CHUNK_LOGITS // head.out_features)
            # The instance's forward, bound to the layer (a deep copy of the model rebinds it to the copy's
            # layer); the class's forward runs whenever nothing is armed.
            head._labelled_logits = self
            head.forward = types.MethodType(_chunked_forward, head)

    # -- per batch ---------------------------------------------------------------------------------------
    def targets_of(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` shifted to the positions that predict them: (B, T), -100 where nothing is predicted."""
        if self.shift == 0:
            return labels
        return F.pad(labels[:, self.shift:], (0, self.shift), value=IGNORE)

    def arm(self, labels: torch.Tensor) -> None:
        """The next forward projects only the positions with a target in ``labels`` (no-op when off)."""
        if self.mode == "off":
            return
        targets = self.targets_of(labels)
        keep = targets != IGNORE
        self._targets = targets[keep]
        self._armed = (keep, self._targets)

    def _gather(self, module, args):
        armed, self._armed = self._armed, None  # one forward call, then disarmed
        if armed is None:
            return None
        keep, targets = armed
        x = args[0]
        if x.shape[:-1] != keep.shape:
            raise UserError(f"model.labelled_logits: the output layer got inputs of shape {tuple(x.shape)}, not one "
                            f"row per position of the labels {tuple(keep.shape)}; set model.labelled_logits=false")
        if self.mode == "chunked":
            module._labelled_targets = targets
        return (x[keep],) + tuple(args[1:])

    def __call__(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        """The cross-entropy over the targets of ``labels`` (-100 = none), SUMMED, in fp32: whichever mode
        ran (the logits' shape says which: (B, T, V) full, (N, V) gathered, a 0-d loss from chunked)."""
        logits = outputs.logits
        targets, self._targets = self._targets, None
        if logits.dim() == 0:
            if self.mode != "chunked":
                raise RuntimeError("labelled_logits: the model returned a 0-d tensor as logits")
            return logits
        if logits.dim() == 2:
            if targets is None or targets.numel() != logits.shape[0]:
                raise RuntimeError("labelled_logits: gathered logits without the targets of an armed forward")
            return F.cross_entropy(logits.float(), targets, reduction="sum")
        full = self.targets_of(labels)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), full.reshape(-1), ignore_index=IGNORE,
                               reduction="sum")


def _chunked_forward(head, x: torch.Tensor) -> torch.Tensor:
    """The output layer's forward: the summed cross-entropy of the rows ``x`` when armed, else the layer."""
    targets = head.__dict__.pop("_labelled_targets", None)
    if targets is None:
        return type(head).forward(head, x)
    loss: CausalLMLoss = head._labelled_logits
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    grad = torch.is_grad_enabled()
    need = (grad and x.requires_grad, grad and head.weight.requires_grad,
            grad and head.bias is not None and head.bias.requires_grad)
    recompute = loss.recompute or dtype == torch.float16
    return LinearCrossEntropy.apply(x, head.weight, head.bias, targets, loss.chunk_rows, dtype, need, recompute)


def _cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, grad: bool):
    """(summed cross-entropy of the fp32 ``logits`` rows, d(that)/d(logits) or None), the gradient made in
    place of ``logits`` (no second buffer of the chunk's size: ``torch.logsumexp`` would make one)."""
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    top = logits.amax(dim=1, keepdim=True)
    e = logits.sub_(top).exp_()
    total = e.sum(dim=1)
    loss = (top.squeeze(1) + total.log() - picked).sum()
    if not grad:
        return loss, None
    p = e.div_(total.unsqueeze(1))
    p.scatter_add_(1, targets.unsqueeze(1), p.new_full((len(targets), 1), -1.0))
    return loss, p


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(x_i @ W^T + b, t_i), chunk by chunk over the rows of ``x``; never more than one chunk of
    logits. The matmuls run in ``dtype`` (the autocast dtype, or the inputs'), the softmax and the loss in
    fp32. ``need``: which of x, W, b get a gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, chunk_rows, dtype, need, recompute):
        with torch.autocast(x.device.type, enabled=False):
            xs, w = x.to(dtype), weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=x.device)
            grads = None if recompute or not any(need) else _buffers(x, weight, bias, need)
            for start in range(0, len(x), chunk_rows):
                xc, tc = xs[start:start + chunk_rows], targets[start:start + chunk_rows]
                loss, p = _cross_entropy_(F.linear(xc, w, b).float(), tc, grads is not None)
                total += loss
                if p is not None:
                    _accumulate(grads, p.to(dtype), xc, w, start)
                del p
        ctx.need, ctx.recompute, ctx.grads = need, recompute, grads
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        if recompute and any(need):
            ctx.save_for_backward(x, weight, bias, targets)
            ctx.chunk_rows, ctx.dtype = chunk_rows, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        need = ctx.need
        if ctx.recompute:
            x, weight, bias, targets = ctx.saved_tensors
            grads = _buffers(x, weight, bias, need)
            with torch.autocast(x.device.type, enabled=False):
                xs, w = x.to(ctx.dtype), weight.to(ctx.dtype)
                b = bias.to(ctx.dtype) if bias is not None else None
                scale = grad_total.float()
                for start in range(0, len(x), ctx.chunk_rows):
                    xc, tc = xs[start:start + ctx.chunk_rows], targets[start:start + ctx.chunk_rows]
                    _, p = _cross_entropy_(F.linear(xc, w, b).float(), tc, True)
                    _accumulate(grads, p.mul_(scale).to(ctx.dtype), xc, w, start)
                    del p
            out = grads
        else:
            # Computed in forward for a loss of gradient 1: scale by this one (in place: one backward only).
            out = ctx.grads
            ctx.grads = None
            if out is None:
                raise RuntimeError("labelled_logits: backward through the chunked loss twice")
            out = [g.mul_(grad_total) if g is not None else None for g in out]
        gx, gw, gb = (g.to(dtype) if g is not None else None for g, dtype in zip(out, ctx.dtypes))
        return gx, gw, gb, None, None, None, None, None


def _buffers(x, weight, bias, need) -> list:
    """fp32 gradient accumulators for x, W, b (None for those that need none)."""
    return [torch.zeros(t.shape, dtype=torch.float32, device=t.device) if n and t is not None else None
            for t, n in zip((x, weight, bias), need)]


def _accumulate(grads: list, g: torch.Tensor, xc: torch.Tensor, w: torch.Tensor, start: int) -> None:
    """Add one chunk's gradients: ``g`` = dloss/dlogits of rows ``start:`` (in the matmul dtype)."""
    gx, gw, gb = grads
    if gx is not None:
        gx[start:start + len(g)] = g @ w
    if gw is not None:
        if gw.dtype == g.dtype:
            gw.addmm_(g.t(), xc)
        else:
            gw += g.t() @ xc
    if gb is not None:
        gb += g.sum(0, dtype=torch.float32)
