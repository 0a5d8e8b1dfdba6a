"""LoRA adapters (and QLoRA's 4-bit base) through PEFT: wrapping and adapter weights (the LoRA
fields are checked with their config section, sft/config/sections.py).

A LoRA run wraps the loaded model with ``peft.get_peft_model`` before the strategy prepares it, so every
strategy (DDP, DeepSpeed ZeRO-2/3, FSDP2) sees one module whose only trainable parameters are the adapters
(and the ``additional_target`` modules, trained in full). The optimizer is built over trainable parameters
only, so it holds no state for the frozen base.

A checkpoint's ``<cluster_name>/`` then holds the adapter as PEFT writes it (``adapter_config.json``,
``adapter_model.safetensors``), cut from the strategy's *full* state dict: under ZeRO-3 that dict is gathered
across processes first, so the adapter is never the empty partition a process holds alone.
"""

from __future__ import annotations

import os
import re

from sft.config.sections import REGEX_CHARS
from sft.errors import ConfigError

ALL_LINEAR = "all-linear"


def lora_enabled(model_args) -> bool:
    return model_args.lora_rank > 0


def describe(model_args) -> str:
    """The adapter a run trains, for its run state and log: "" when it trains all weights."""
    if not lora_enabled(model_args):
        return ""
    text = f"LoRA r={model_args.lora_rank} alpha={lora_alpha(model_args):g} target={','.join(model_args.lora_target)}"
    if model_args.additional_target:
        text += f" + full {','.join(model_args.additional_target)}"
    return text + (" on a 4-bit base" if model_args.quantization_bit else "")


def lora_alpha(model_args) -> float:
    return model_args.lora_alpha if model_args.lora_alpha is not None else 2.0 * model_args.lora_rank


def target_modules(model_args):
    """lora_target as PEFT takes it: "all-linear", a regex string, or a list of module-name suffixes."""
    targets = list(model_args.lora_target)
    if targets == [ALL_LINEAR]:
        return ALL_LINEAR
    if len(targets) == 1 and REGEX_CHARS.search(targets[0]):
        return targets[0]
    return targets


def moe_targets(model, experts: int) -> tuple[list[str], list[str], list[str]]:
    """``all-linear`` on an MoE model: (every linear layer but the output layer and the routers, every fused expert
    weight (a 3D parameter, one slice per expert), the routers left frozen).

    The router stays frozen by default: it decides which expert sees which token, and a small fine-tuning set
    moving it shifts the experts' load away from what pretraining balanced. PEFT's own ``all-linear`` adapts it for
    some families (Qwen3-MoE, Mixtral) and not others (gpt-oss); naming it (``lora_target: [..., gate]``) adapts it.
    """
    import torch

    head = model.get_output_embeddings()
    routers = [name for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in ("gate", "router") and getattr(module, "weight", None) is not None
               and module.weight.dim() == 2 and module.weight.shape[0] == experts]
    linear = [name for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and module is not head and name not in routers]
    fused = [f"{name}.{parameter_name}" for name, module in model.named_modules()
             if not isinstance(module, torch.nn.modules.conv._ConvNd)
             for parameter_name, parameter in module.named_parameters(recurse=False)
             if parameter.dim() == 3 and parameter.shape[0] == experts]
    return linear, fused, routers


def apply_lora(model, model_args, experts: int = 0):
    """The model wrapped with LoRA adapters (a PeftModel); the base's weights are frozen. ``experts``: routed experts
    per MoE layer (0: dense), for all-linear's choice on MoE models (moe_targets)."""
    from peft import LoraConfig, get_peft_model

    if model_args.quantization_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_args.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    name = getattr(model, "name_or_path", "")
    if name and os.path.isdir(name):  # adapter_config.json names the base: absolute, so export and chat find it anywhere
        model.name_or_path = os.path.abspath(name)
    targets, parameters = target_modules(model_args), None
    if targets == ALL_LINEAR and experts:
        targets, parameters, _ = moe_targets(model, experts)
    config = LoraConfig(r=model_args.lora_rank, lora_alpha=lora_alpha(model_args), lora_dropout=model_args.lora_dropout,
                        target_modules=targets, target_parameters=parameters or None,
                        modules_to_save=list(model_args.additional_target) or None, task_type="CAUSAL_LM")
    full = [name for name, _ in model.named_modules() if name]
    names = sorted({name.rsplit(".", 1)[-1] for name in full if not name.rsplit(".", 1)[-1].isdigit()})
    # PEFT skips a listed name that matches no module without a word; a typo would train less than asked.
    named = config.target_modules if isinstance(config.target_modules, set) and not parameters else ()
    for field, wanted in (("lora_target", named),
                          ("additional_target", model_args.additional_target)):
        unknown = sorted(name for name in wanted if not any(f == name or f.endswith("." + name) for f in full))
        if unknown:
            raise ConfigError(f"sft_train.model_args.{field}: no module of the model is named {', '.join(unknown)}; its "
                              f"module names are: {', '.join(names)}")
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # a regex or all-linear that matched nothing; PEFT names it
        raise ConfigError(f"sft_train.model_args.lora_target: {error}. The model's module names are: "
                          f"{', '.join(names)}") from None


def adapted_modules(model) -> str:
    """Which modules and expert weights of a PeftModel carry adapters, for the run report: each module path with
    the layer number folded (``layers.*.self_attn.q_proj x 4``), fused expert weights by parameter name."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or not module.lora_A:
            continue
        path = re.sub(r"\.\d+\.", ".*.", name.removeprefix("base_model.model.").replace(".base_layer", ""))
        parameter = getattr(module, "parameter_name", None)
        key = f"{path}[{parameter}]" if parameter else path
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{key} x {count}" for key, count in sorted(counts.items()))


def load_adapter_weights(model, folder: str, device) -> None:
    """Load a checkpoint's adapter (adapter_model.safetensors) into the live PeftModel; every trainable
    parameter must be in it."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from sft.train.checkpoint import CheckpointError

    path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {folder} has no adapter_model.safetensors; it is incomplete or was "
                              "saved by a full-weight run (resume it with lora_rank: 0)")
    weights = load_file(path, device=device)
    if not weights:
        raise CheckpointError(f"checkpoint {path} holds no tensors (an empty adapter)")
    result = set_peft_model_state_dict(model, weights)
    missing = [name for name, parameter in model.named_parameters()
               if parameter.requires_grad and name in set(getattr(result, "missing_keys", []))]
    if missing:
        raise CheckpointError(f"checkpoint {folder} has no weights for {', '.join(missing[:4])}; it was saved with "
                              "other lora_rank / lora_target / additional_target settings")


def check_saved(model_folder: str) -> None:
    """After a save: an adapter folder must hold every adapter tensor with its data (ZeRO-3 + LoRA has been known
    to write empty ones elsewhere). A full-model folder passes."""
    path = os.path.join(model_folder, "adapter_model.safetensors")
    if not os.path.isfile(os.path.join(model_folder, "adapter_config.json")):
        return
    from safetensors import safe_open

    from sft.train.checkpoint import CheckpointError

    with safe_open(path, framework="pt") as handle:
        names = list(handle.keys())
        empty = [name for name in names if 0 in handle.get_slice(name).get_shape()]
    if not names or empty:
        raise CheckpointError(f"saving {path}: the adapter has {len(names)} tensors, empty: {empty[:4]}; the state dict "
                              "was not gathered across processes")


def check_quantization(model_args, on_gpu: bool) -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes; refuse clearly elsewhere (before any weight is loaded)."""
    if not model_args.quantization_bit:
        return
    if not on_gpu:
        raise ConfigError("sft_train.model_args.quantization_bit: 4-bit QLoRA needs a CUDA GPU (bitsandbytes' 4-bit "
                          "kernels); this machine has none. Train LoRA on the full-precision base (quantization_bit: 0)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("sft_train.model_args.quantization_bit: 4-bit QLoRA needs bitsandbytes: "
                          "pip install bitsandbytes") from None


def quantization_config(model_args):
    """transformers' BitsAndBytesConfig for a 4-bit NF4 base (bf16 compute), or None."""
    if not model_args.quantization_bit:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
