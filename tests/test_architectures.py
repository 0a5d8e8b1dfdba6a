"""The architecture matrix (packing and the loss guarantee on the 2026 families): with the defaults, a packed step equals the
same samples alone, loss, router loss and every gradient; the router loss is the model's own; what cannot be kept
apart is refused by name, before any weight is loaded."""

import pytest
import torch

from sft.train.architectures import Architecture, ArchitectureError
from sft.train.attention import watch_packed_rows
from sft.data.collate import pad_collate
from sft.train.hybrid import separate_samples
from sft.train.modeling import attention_implementation, forward_loss
from sft.train.moe import Router
from tests.architectures import FAMILIES, FLOAT32_INSIDE, ROUTER_TOLERANCE, config
from tests.test_varlen import packed_batch, random_samples

# What `auto` picks per family (unpacked, packed), how many recurrent/conv layers run per sample, and whether the
# router loss is on: the matrix in docs/training.md#model-families, checked here.
MATRIX = {
    "llama": ("varlen", 0, False), "qwen2": ("varlen", 0, False), "qwen3": ("varlen", 0, False),
    "mistral": ("varlen", 0, False), "phi3": ("varlen", 0, False), "gemma2": ("varlen_eager", 0, False),
    "gemma3_text": ("varlen", 0, False), "olmo2": ("varlen", 0, False), "glm4": ("varlen", 0, False),
    "smollm3": ("varlen", 0, False), "qwen3_moe": ("varlen", 0, True), "mixtral": ("varlen", 0, True),
    "gpt_oss": ("varlen_eager", 0, True), "deepseek_v3": ("varlen", 0, False), "qwen3_next": ("varlen", 3, True),
    "lfm2": ("varlen", 2, False), "granitemoehybrid": ("varlen", 2, True),
}


def build(family: str, packed: bool):
    """The tiny float64 model as the worker loads it with the defaults (attn auto), and its router."""
    from transformers import AutoModelForCausalLM

    model_config = config(family)
    architecture = Architecture.of(model_config)
    if packed:
        architecture.check_packing()
    attn = attention_implementation(architecture.attention("auto", packed))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config, attn_implementation=attn,
                                             experts_implementation="eager").double()
    mixers = []
    if packed:
        watch_packed_rows(model)
        mixers = separate_samples(model, architecture.stateful)
    router = None
    if architecture.router_loss:
        router = Router.of(model, architecture.experts, architecture.experts_per_token,
                           architecture.router_coefficient(None))
    return model, router, attn, mixers


def step(model, router, batches, targets: int, tokens: int):
    """The worker's objective over a step's batches (sft/train/worker.py, one process): summed cross-entropy / targets +
    coefficient x per-sample router loss / tokens; returns the summed loss, the router sum and the gradients."""
    model.zero_grad(set_to_none=True)
    loss = aux = 0.0
    for batch in batches:
        forward = forward_loss(model, batch, 0, router)
        objective = forward.loss_sum / targets
        if forward.router is not None:
            objective = objective + forward.router.weighted_sum * (router.coefficient / tokens)
            aux += float(forward.router.weighted_sum.detach())
        objective.backward()
        loss += float(forward.loss_sum.detach())
    return loss, aux, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_step_equals_the_samples_alone(family):
    samples = random_samples(3, count=8, longest=30)  # most samples are longer than the 6-token windows
    targets = sum(sum(1 for label in s["labels"][1:] if label != -100) for s in samples)
    tokens = sum(len(s["input_ids"]) for s in samples)
    model, router, attn, _ = build(family, packed=False)
    alone = step(model, router, [pad_collate([s], pad_id=0) for s in samples], targets, tokens)
    model, router, packed_attn, mixers = build(family, packed=True)
    batch = packed_batch(samples, capacity=64)
    assert batch["input_ids"].shape[0] >= 2 and "attention_mask" not in batch
    packed = step(model, router, [batch], targets, tokens)
    assert (attn, len(mixers), router is not None) == MATRIX[family] and packed_attn == attn
    tolerance = FLOAT32_INSIDE.get(family, 1e-10)
    assert abs(packed[0] - alone[0]) <= tolerance * abs(alone[0])
    if router is not None:
        tolerance = max(tolerance, ROUTER_TOLERANCE)
    assert abs(packed[1] - alone[1]) <= tolerance * max(abs(alone[1]), 1e-300)
    assert (packed[1] > 0) == (router is not None)
    for name, gradient in alone[2].items():
        scale = float(gradient.abs().max())
        assert float((packed[2][name] - gradient).abs().max()) <= tolerance * max(scale, 1e-12), name


@pytest.mark.parametrize("family", [f for f, (_, _, router) in MATRIX.items() if router])
def test_router_loss_is_the_models_own(family):
    """One sample: our objective (cross-entropy mean + coefficient x router term) is the model's own loss (float32:
    the models' own forward cannot add its float32 router loss to a float64 loss)."""
    model, router, _, _ = build(family, packed=False)
    model.float()
    assert router.coefficient == 10.0  # the model config's router_aux_loss_coef, the default
    sample = random_samples(5, count=1, longest=30)[0]
    batch = pad_collate([sample], pad_id=0)
    with torch.no_grad():
        forward = forward_loss(model, batch, 0, router)
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    output_router_logits=True, use_cache=False)
    ours = forward.loss_sum / forward.targets + router.coefficient * forward.router.weighted_sum / forward.router.tokens
    assert torch.allclose(ours, own.loss, rtol=1e-6)
    assert torch.allclose(forward.router.weighted_sum / forward.router.tokens, own.aux_loss, rtol=1e-6)
    assert forward.router.expert_counts.sum() == len(sample["input_ids"]) * 2 * forward.router.expert_counts.shape[0]


def test_packed_rows_of_unknown_attention_are_refused_before_loading():
    architecture = Architecture.of(_llama4())
    with pytest.raises(ArchitectureError, match="'chunked_attention'.*use_sequence_packing: false"):
        architecture.check_packing()
    assert architecture.attention("auto", packed=False) == "varlen"


def _llama4():
    from transformers import AutoConfig

    return AutoConfig.for_model("llama4_text", vocab_size=101, hidden_size=32, intermediate_size=64,
                                intermediate_size_mlp=64, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, attention_chunk_size=8)


def test_choices_the_model_does_not_have_are_refused_by_name():
    gpt_oss = Architecture.of(config("gpt_oss"))
    with pytest.raises(ArchitectureError, match="gpt_oss has no sdpa"):
        gpt_oss.attention("sdpa", packed=True)
    assert gpt_oss.attention("eager", packed=True) == "varlen_eager"  # eager math, within each sample
    assert gpt_oss.attention("eager", packed=False) == "eager"
    assert Architecture.of(config("qwen3")).attention("sdpa", packed=True) == "varlen"
    with pytest.raises(ArchitectureError, match="qwen3 has no router"):
        Architecture.of(config("qwen3")).router_coefficient(0.01)
    assert Architecture.of(config("qwen3_moe")).router_coefficient(0.0) == 0.0  # 0 turns it off


def test_a_sequence_mixer_without_a_convolution_is_refused():
    class ToyMambaMixer(torch.nn.Module):  # a state along the sequence that nothing here can reset per sample
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    model = torch.nn.Sequential(ToyMambaMixer())
    with pytest.raises(ArchitectureError, match=r"0 \(ToyMambaMixer\).*use_sequence_packing: false"):
        separate_samples(model, expect_stateful=False)
    with pytest.raises(ArchitectureError, match="recurrent or convolution layers"):
        separate_samples(torch.nn.Sequential(torch.nn.Linear(4, 4)), expect_stateful=True)


def test_the_matrix_covers_the_families_of_the_issue():
    assert set(MATRIX) == set(FAMILIES)
    described = Architecture.of(config("qwen3_next")).describe()
    assert described == "qwen3_next (3 linear attention, 1 full attention; 4 experts, 2 per token)"


# ----- through scripts/train.py -------------------------------------------------------------------------------
ROWS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."}
        for a in range(3) for b in range(3)]


@pytest.fixture(scope="module")
def train_script():
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("train_script", f"{ROOT}/scripts/train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_once(train_script, folder, *overrides) -> dict:
    """scripts/train.py's main in this process (one process, ddp_train); returns metrics.jsonl's values, merged."""
    import json

    from accelerate.state import AcceleratorState

    from sft.config import load_config

    AcceleratorState._reset_state(reset_partial_state=True)
    output = folder / f"out{len(list(folder.glob('out*')))}"
    train_script.main(load_config(str(folder / "run.yaml"), ["--output_dir", str(output), *overrides]))
    AcceleratorState._reset_state(reset_partial_state=True)
    values = {}
    for line in (output / "logs" / "metrics.jsonl").read_text().splitlines():
        values.update(json.loads(line))
    return values


def write_run(folder, family: str) -> None:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.data.local_tokenizer import CHATML_JINJA, save_byte_tokenizer

    model = folder / "model"
    save_byte_tokenizer(str(model), chat_template=CHATML_JINJA)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(config(family, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                            eos_token_id=tokenizer.eos_token_id, bos_token_id=None)).save_pretrained(model)
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (folder / "run.yaml").write_text(f"""
seed: 3
sequence_length: 160
pretrain: {model}
logging_steps: 1
save_steps: 100
sft_train:
  model_args: {{dtype: fp32}}
  training_args: {{max_steps: 1, learning_rate: 1.0e-3, per_device_train_batch_size: {len(ROWS)}}}
  data_args: {{file_name: {folder / 'train.jsonl'}, template: chatml}}
""")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_script_packed_equals_unpacked(train_script, tmp_path, family):
    """One step of all samples, padded and packed, with the defaults: the same loss, router loss and gradient norm
    (float32, relative 1e-5: float32's rounding over a few layers); the router loss moves the gradient and 0 turns
    it off."""
    from sft.data.packing import build_packed
    from sft.data.pipeline import load_encoded

    write_run(tmp_path, family)
    padded = train_once(train_script, tmp_path)
    encoded = next((tmp_path / "out0" / "encoded").glob("*/train"))
    rows = len(build_packed(load_encoded(str(encoded)), 160, "bfd")[0])
    assert rows < len(ROWS)
    packed = train_once(train_script, tmp_path, "--sft_train.use_sequence_packing", "true",
                        "--sft_train.training_args.per_device_train_batch_size", str(rows))
    router = MATRIX[family][2]
    for key in ("train/loss", "train/grad_norm") + (("train/aux_loss", "moe/expert_load_max") if router else ()):
        assert packed[key] == pytest.approx(padded[key], rel=1e-5), key
    assert padded["train/samples_seen"] == packed["train/samples_seen"] == len(ROWS)
    assert ("train/aux_loss" in padded) == router
    if not router:
        return
    off = train_once(train_script, tmp_path, "--sft_train.model_args.router_aux_loss_coef", "0")
    assert off["train/loss"] == pytest.approx(padded["train/loss"], rel=1e-6)  # the cross-entropy alone
    assert off["train/grad_norm"] != pytest.approx(padded["train/grad_norm"], rel=1e-3)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_lora_all_linear_on_moe_adapts_experts_and_leaves_the_router_frozen(family):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from sft.train.lora import adapted_modules, apply_lora

    def lora(*targets):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config(family), experts_implementation="eager")
        args = SimpleNamespace(lora_rank=2, lora_alpha=None, lora_dropout=0.0, lora_target=list(targets),
                               additional_target=[], quantization_bit=0)
        return apply_lora(model, args, Architecture.of(config(family)).experts)

    model = lora("all-linear")
    adapted = adapted_modules(model)
    router = "mlp.gate" if family == "qwen3_moe" else "mlp.router"
    assert "model.layers.*.mlp.experts[gate_up_proj] x 4" in adapted and "[down_proj] x 4" in adapted
    assert "model.layers.*.self_attn.q_proj x 4" in adapted and router not in adapted
    batch = pad_collate(random_samples(2, count=3, longest=20), pad_id=0)
    forward_loss(model, batch).loss_sum.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "experts" not in n)
    if family == "qwen3_moe":  # named, the router is adapted (gpt-oss's router is no Linear: PEFT refuses it by name)
        assert router in adapted_modules(lora("q_proj", "gate"))
