"""Function-preserving rescaling of Llama-like decoder layers: the same function (identical logits up to rounding) with
target weights at a different scale. The test bench for scale-free mask learning: a recipe that means the same on any
model must learn the same mask on both copies.

In every decoder layer (``input_layernorm`` → ``self_attn.{q,k,v}_proj`` → ``o_proj``; ``post_attention_layernorm`` →
``mlp.{gate,up}_proj`` → ``down_proj``), with factors ``c_q, c_k, c_v, c_g, c_u`` for the five input-side projections:

* ``input_layernorm`` is divided by ``a = √(c_q·c_k)``; ``q`` and ``k`` are multiplied by ``c_q``, ``c_k`` (the
  attention scores ``q·k`` only see ``a²``, which the norm undoes; rotary embeddings are linear); ``v`` by ``c_v``,
  and ``o_proj`` by ``a / c_v`` (the attention output is linear in ``v``);
* ``post_attention_layernorm`` is divided by ``c_g``; ``gate`` multiplied by ``c_g`` (its input is back to the
  original, as the activation needs); ``up`` by ``c_u`` and ``down_proj`` by ``c_g / c_u`` (``act(gate) ⊙ up`` is
  linear in ``up``).

One factor ``c`` for everything scales ``q, k, v, gate, up`` by ``c`` and both norms by ``1/c`` (``o_proj`` and
``down_proj`` unchanged); a mapping gives each layer and projection its own factor, so every target ends up rescaled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["INPUT_SIDE_PROJECTIONS", "rescale_function_preserving"]

INPUT_SIDE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def _decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(prefix, layer)`` of every Llama-like decoder layer; ``ValueError`` when the model has none or another shape."""
    layers = []
    for name, module in model.named_modules():
        attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        if attn is None or mlp is None:
            continue
        needed = [
            (attn, "q_proj"),
            (attn, "k_proj"),
            (attn, "v_proj"),
            (attn, "o_proj"),
            (mlp, "gate_proj"),
            (mlp, "up_proj"),
            (mlp, "down_proj"),
            (module, "input_layernorm"),
            (module, "post_attention_layernorm"),
        ]
        missing = [part for owner, part in needed if not hasattr(owner, part)]
        extra = [part for part in ("q_norm", "k_norm") if hasattr(attn, part)]
        if missing or extra:
            raise ValueError(
                f"Decoder layer `{name}` ({type(module).__name__}) is not Llama-like (missing {missing}, per-head norms "
                f"{extra}); rescale_function_preserving supports q/k/v/o + gate/up/down projections behind two norms."
            )
        for norm_name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(module, norm_name)
            if type(norm).__name__.startswith("Gemma") or not isinstance(getattr(norm, "weight", None), torch.Tensor):
                raise ValueError(f"`{name}.{norm_name}` ({type(norm).__name__}) is not a plain weight-times-x norm.")
        layers.append((name, module))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Llama-like decoder layer (self_attn + mlp).")
    return layers


def _factor(factors: float | Mapping[str, float], prefix: str, projection: str) -> float:
    if isinstance(factors, Mapping):
        key = f"{prefix}.{'self_attn' if projection in ('q_proj', 'k_proj', 'v_proj') else 'mlp'}.{projection}"
        if key not in factors:
            raise KeyError(f"`factors` has no entry for `{key}`; give one for every {INPUT_SIDE_PROJECTIONS} module.")
        value = factors[key]
    else:
        value = factors
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"The factor of `{prefix}` {projection} is {value!r}; allowed: a finite number > 0.")
    return float(value)


@torch.no_grad()
def rescale_function_preserving(model: nn.Module, factors: float | Mapping[str, float]) -> dict[str, float]:
    """Rescale a Llama-like model in place without changing its function (see the module docstring).

    Args:
        model: e.g. a ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``.
        factors: one factor for the five input-side projections of every layer, or
            ``{module_name: factor}`` with an entry for every ``q/k/v/gate/up_proj`` module (e.g.
            ``"model.layers.0.self_attn.q_proj"``); ``o_proj`` and ``down_proj`` get the compensating factors.

    Returns:
        ``{weight_name: factor}`` for every projection weight (the factor its weight was multiplied by).

    Raises:
        ValueError: the model is not Llama-like, or a factor is not a finite number > 0.
    """
    layers = _decoder_layers(model)
    plan = []
    for prefix, layer in layers:  # validate everything before changing anything
        c = {p: _factor(factors, prefix, p) for p in INPUT_SIDE_PROJECTIONS}
        attn_in = math.sqrt(c["q_proj"] * c["k_proj"])
        c["o_proj"] = attn_in / c["v_proj"]
        c["down_proj"] = c["gate_proj"] / c["up_proj"]
        plan.append((prefix, layer, c, attn_in))
    applied: dict[str, float] = {}
    for prefix, layer, c, attn_in in plan:
        for norm, divisor in ((layer.input_layernorm, attn_in), (layer.post_attention_layernorm, c["gate_proj"])):
            norm.weight.div_(divisor)
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(divisor)
        for part, owner in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for projection, factor in c.items():
                module = getattr(owner, projection, None)
                if module is None:
                    continue
                module.weight.mul_(factor)
                if module.bias is not None and projection not in ("o_proj", "down_proj"):
                    module.bias.mul_(factor)  # the output of an input-side projection is scaled with its weight
                applied[f"{prefix}.{part}.{projection}.weight"] = factor
    return applied
