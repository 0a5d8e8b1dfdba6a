"""What a model's config says about training it exactly, read before any weight is loaded.

One ``Architecture`` per run: the family (``model_type``), its layer types, whether it has recurrent or
convolution layers, its experts and router loss. From it come two decisions:

* the attention to load the model with (``attention``). ``auto`` is per-sample attention (sft/train/attention.py):
  ``varlen`` (SDPA math, or FlashAttention's varlen kernel on a GPU, within each sample; sliding windows,
  attention sinks and soft-capping handled) for a model that transformers runs with sdpa, ``varlen_eager`` (the
  model's own eager function within each sample) for one it does not (gpt-oss, Gemma 2). A packed run that asks
  for ``sdpa`` or ``eager`` gets the same per-sample attention with that math: transformers' own block mask
  keeps samples apart only where a model hands position_ids to its mask builder, and some do not (gpt-oss);
* whether packed rows can be trained exactly (``check_packing``). Attention layers are kept apart by the
  per-sample attention; linear-attention, convolution and Mamba layers run once per sample (sft/train/hybrid.py);
  the layer types that neither keeps apart (chunked, windowed-block, indexed and compressed sparse attention)
  are refused by name.

transformers names every layer type it knows (configuration_utils.ALLOWED_LAYER_TYPES); the tables below sort
that closed list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sft.errors import UserError

# Layer types whose attention sft/train/attention.py computes within each sample (with the layer's window).
PER_SAMPLE_ATTENTION = frozenset({"full_attention", "sliding_attention", "attention"})
# Layer types that carry a state along the sequence (Gated DeltaNet, Mamba, short convolutions): run per sample.
STATEFUL = frozenset({"linear_attention", "conv", "hybrid", "hybrid_sliding", "mamba"})
# Layer types that only choose the MLP (dense, sparse experts): nothing crosses tokens.
MLP_ONLY = frozenset({"dense", "sparse", "moe"})
# Config keys of models with recurrent or convolution layers but no layer_types (Falcon-H1, Nemotron-H, Jamba).
_STATEFUL_KEYS = re.compile(r"mamba|ssm_|_ssm|conv_kernel|conv_l_cache|linear_conv|linear_num|recurrent|rwkv|lru_|"
                            r"hybrid_override|attn_layer_period")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class ArchitectureError(UserError):
    """A model setup that cannot be trained exactly (packing a layer type that mixes samples, an attention the model
    does not have)."""


@dataclass(frozen=True)
class Architecture:
    family: str
    layers: tuple[tuple[str, int], ...]  # (layer type, count), in order of first appearance
    stateful: bool  # recurrent or convolution layers (run per sample when packed)
    experts: int  # routed experts per MoE layer (0: dense)
    experts_per_token: int
    router_loss: bool  # the model's forward can add a router auxiliary loss (output_router_logits)
    router_aux_loss_coef: float
    supports_sdpa: bool

    @classmethod
    def of(cls, config) -> "Architecture":
        """From a transformers config (no weights)."""
        count = config.num_hidden_layers if isinstance(getattr(config, "num_hidden_layers", None), int) else 0
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * count)
        layers: dict[str, int] = {}
        for kind in types:
            layers[kind] = layers.get(kind, 0) + 1
        keys = config.to_dict()
        stateful = bool(STATEFUL & set(layers)) or any(_STATEFUL_KEYS.search(key.lower()) for key in keys)
        experts = next((int(keys[key]) for key in _EXPERT_KEYS if isinstance(keys.get(key), int)), 0)
        return cls(family=config.model_type, layers=tuple(layers.items()), stateful=stateful, experts=experts,
                   experts_per_token=int(keys.get("num_experts_per_tok") or 0) if experts else 0,
                   router_loss=experts > 0 and "output_router_logits" in keys and "router_aux_loss_coef" in keys,
                   router_aux_loss_coef=float(keys.get("router_aux_loss_coef") or 0.0),
                   supports_sdpa=_supports_sdpa(config))

    def attention(self, requested: str, packed: bool) -> str:
        """The attn_implementation to load the model with for ``requested`` (the config's choice)."""
        if requested == "auto":
            return "varlen" if self.supports_sdpa else "varlen_eager"
        if requested == "sdpa" and not self.supports_sdpa:
            raise ArchitectureError(f"{self.family} has no sdpa attention in transformers (its layers need math sdpa "
                                    "does not do); set sft_train.model_args.attn_implementation: auto (or eager)")
        if packed and requested in ("sdpa", "eager"):
            return "varlen" if requested == "sdpa" else "varlen_eager"
        return requested

    def check_packing(self) -> None:
        """Refuse packed rows for layer types that nothing here keeps apart, naming the type and what to set."""
        for kind, count in self.layers:
            if kind not in PER_SAMPLE_ATTENTION | STATEFUL | MLP_ONLY:
                raise ArchitectureError(
                    f"{self.family}: {count} layer(s) of type {kind!r} would let packed samples see each other (no "
                    "per-sample form of that attention here); set sft_train.use_sequence_packing: false (and train on "
                    "an unpacked encoded_path)")

    def describe(self) -> str:
        """One line for the run log: the layers, experts and router loss."""
        layers = ", ".join(f"{count} {kind.replace('_', ' ')}" for kind, count in self.layers)
        experts = f"; {self.experts} experts, {self.experts_per_token} per token" if self.experts else ""
        return f"{self.family} ({layers}{experts})"

    def router_coefficient(self, configured: float | None) -> float:
        """The router loss coefficient a run trains with: the field's value, else the model config's; 0 without a
        router loss. A non-zero field on a model without one is refused."""
        if not self.router_loss:
            if configured:
                raise ArchitectureError(f"{self.family} has no router auxiliary loss (no output_router_logits in its "
                                        "config); remove sft_train.model_args.router_aux_loss_coef")
            return 0.0
        return self.router_aux_loss_coef if configured is None else float(configured)


def _supports_sdpa(config) -> bool:
    """Whether transformers runs this family's causal LM with sdpa (a class attribute: no weights, no instance)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return True  # not a registered causal LM (a remote-code model): its own load will say
    return bool(getattr(model_class, "_supports_sdpa", True))
