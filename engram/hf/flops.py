"""Forward FLOPs per token of a Hugging Face causal LM and of the Engram layers attached to it.

Convention (the same as `engram.model.flops_per_token`): 1 multiply-accumulate = 2 FLOPs, counted
for every weight matrix applied to a token's activations, plus attention's scores and weighted
values at the causal average context seq_len / 2.

- `hf_flops_per_token(model, seq_len)`: every `nn.Linear` and GPT-2 `Conv1D` of the model (the
  attention and MLP projections of each decoder layer and the LM head, tied or not), counted by
  its weight's shape, plus 2 * n_layers * seq_len * (n_heads * head_dim) for QK^T and AV; with
  `include_engram=True` (default) plus `engram_flops_per_token` of an attached Engram.
- `engram_flops_per_token(att)`: per Engram layer, the M key projections and the value projection
  (E x D each, M = hc_mult), the gate's dot products (D per branch) and the depthwise short conv
  (kernel * M * D). `engram.model.flops_per_token` leaves the gate's dot products out; they are
  D per layer against 2 * E * D, so the two counts differ by well under 1%.

NOT counted: embedding lookups, table gathers, norms, activations, softmax, biases, residual
additions, and any sliding-window limit on the attention context (full causal attention is
assumed; the supported families use it unless configured otherwise). Hashing runs on the host
and is not a FLOP of the model.
"""

from __future__ import annotations

from torch import nn

from engram.hf.attach import ATTACHMENT, EngramAttachment
from engram.hf.families import find_backbone


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: a Linear with its weight stored (in, out); matched by
    # name so this module does not import transformers.
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def _matmul_macs(model: nn.Module, skip: nn.Module | None) -> int:
    """Multiply-accumulates per token of every Linear / Conv1D in `model` outside `skip`."""
    skipped = set() if skip is None else {id(m) for m in skip.modules()}
    macs = 0
    for m in model.modules():
        if id(m) in skipped:
            continue
        if isinstance(m, nn.Linear) or _is_gpt2_conv1d(m):
            macs += int(m.weight.numel())
    return macs


def _attention_width(config: object, hidden_size: int) -> int:
    """n_heads * head_dim: the width of the queries (GQA shares keys/values, not queries)."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    head_dim = getattr(config, "head_dim", None)
    if heads is None:
        return hidden_size
    if head_dim is None:
        head_dim = hidden_size // int(heads)
    return int(heads) * int(head_dim)


def engram_flops_per_token(att: EngramAttachment) -> int:
    """Forward FLOPs per token of every Engram layer in `att` (see the module docstring)."""
    macs = 0
    for layer in att.engram_layers().values():
        D, M = layer.hidden_size, layer.hc_mult
        macs += sum(int(p.weight.numel()) for p in layer.key_projs)  # M * E * D
        macs += int(layer.value_proj.weight.numel())  # E * D
        macs += M * D  # gate: <norm1(k_m), norm2(h_m)> per branch
        if layer.short_conv is not None:
            macs += layer.short_conv.kernel_size * M * D  # depthwise: one tap per channel
    return 2 * macs


def hf_flops_per_token(model: nn.Module, seq_len: int, *, include_engram: bool = True) -> int:
    """Forward FLOPs per token of a supported causal LM at sequence length `seq_len`."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    backbone = find_backbone(model)
    att = getattr(model, ATTACHMENT, None)
    att = att if isinstance(att, EngramAttachment) else None
    macs = _matmul_macs(model, att)
    width = _attention_width(model.config, backbone.hidden_size)
    attention = 2 * len(backbone.layers) * seq_len * width
    total = 2 * macs + attention
    if include_engram and att is not None:
        total += engram_flops_per_token(att)
    return total
