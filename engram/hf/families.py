"""Where the decoder layers of a Hugging Face causal LM live, per model family.

Design choices:
- A table, not a heuristic: each supported `config.model_type` names the backbone module (the
  one whose forward receives `input_ids`, the attention mask and the KV cache, and loops over
  the decoder layers) and the attribute holding its layer list. Only families the tests build
  (tiny random configs, offline) are listed; any other model fails with its class name.
- The backbone is hooked rather than the `*ForCausalLM` wrapper because wrappers such as
  `peft`'s call the wrapper's `forward` directly (skipping its hooks) but always call the
  backbone as a module.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# model_type -> (backbone attribute on the causal LM, layer-list attribute on the backbone)
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("model", "layers"),
    "mistral": ("model", "layers"),
    "qwen2": ("model", "layers"),
    "qwen3": ("model", "layers"),
    "gpt2": ("transformer", "h"),
}


class UnsupportedModelError(ValueError):
    """The model is not a causal LM of a family engram knows how to attach to."""


@dataclass(frozen=True)
class Backbone:
    """The parts of a causal LM that Engram attaches to."""

    model_type: str
    module: nn.Module  # the backbone: receives input_ids / attention_mask / cache
    layers: nn.ModuleList  # its decoder layers, in order
    hidden_size: int


def find_backbone(model: nn.Module) -> Backbone:
    """The backbone and decoder-layer list of `model`, or `UnsupportedModelError` naming it."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    if model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(
            f"{name} (model_type={model_type!r}) is not a supported architecture; engram.hf "
            f"knows {known}"
        )
    backbone_attr, layers_attr = FAMILIES[model_type]
    backbone = getattr(model, backbone_attr, None)
    layers = getattr(backbone, layers_attr, None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(
            f"{name} has no decoder layers at .{backbone_attr}.{layers_attr}; pass a causal LM "
            f"(e.g. {model_type} *ForCausalLM), not its backbone or a wrapper"
        )
    return Backbone(str(model_type), backbone, layers, int(config.hidden_size))
