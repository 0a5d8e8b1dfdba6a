"""The SFT worker: the seed's operations (initialize, train_step, val_step, do_checkpoint) on Accelerate.

This is the one module (with scripts/train.py) that knows about processes, ranks and devices. The
strategy comes from the run config; the launcher only decides how many processes and machines.

Loss normalisation (guarantee 3): an optimizer step's loss is the mean over all of its target tokens,
across accumulation micro-batches and ranks. Before the first backward of a step, the target-token
count N of the whole step is all-reduced; each micro-batch then backpropagates
``loss_sum * world * accumulation / N``, which undoes the mean over ranks (DDP, ZeRO) and the division
by accumulation steps (Accelerate, DeepSpeed) so the gradient is exactly d(sum of token losses / N).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from typing import Optional

import torch

from sft import checkpoint as ckpt
from sft.collate import pad_collate
from sft.packing import packed_collate
from sft.config import ConfigError, SFTConfig
from sft.modeling import attention_implementation, load_model, loss_sum
from sft.schedule import lr_at


def deepspeed_config(config: SFTConfig) -> dict:
    """The DeepSpeed config of a deepspeed_train run, from strategy_config (or the JSON file it names)."""
    strategy = dict(config.sft_train.strategy_args.strategy_config)
    args = config.sft_train.training_args
    if "deepspeed_config" in strategy:
        with open(strategy.pop("deepspeed_config"), encoding="utf-8") as handle:
            base = json.load(handle)
    else:
        zero = {"stage": int(strategy.get("zero_stage", 2))}
        if strategy.get("offload_optimizer"):
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if strategy.get("offload_param"):
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if "offload_optimizer" in zero:
            base_extra = {"zero_force_ds_cpu_optimizer": False}  # our torch AdamW is used as the client optimizer
        else:
            base_extra = {}
        if zero["stage"] == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        base = {"zero_optimization": zero, **base_extra}
    dtype = config.sft_train.model_args.dtype
    # The run config owns batch shape, clipping and precision; a JSON file's values for them are replaced.
    base.update({
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": config.max_grad_norm if config.max_grad_norm > 0 else 0.0,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })
    return base


def apply_device_mapping(device_ids) -> None:
    """Restrict this process to device_mapping's GPUs (before CUDA starts); each local rank takes one of them."""
    if device_ids is None:
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if local_world > len(device_ids):
        raise SystemExit(f"error: sft_train.device_mapping names {len(device_ids)} device(s) but {local_world} processes "
                         "run on this machine; launch at most that many (--num_processes) or widen device_mapping")
    wanted = ",".join(str(i) for i in device_ids)
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    if current is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = wanted
    elif current != wanted:
        raise SystemExit(f"error: sft_train.device_mapping ({wanted}) disagrees with CUDA_VISIBLE_DEVICES={current}; "
                         "set one of them")


def build_accelerator(config: SFTConfig):
    """The Accelerator for this run: gloo on CPU, DeepSpeed when strategy_name is deepspeed_train."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    apply_device_mapping(config.sft_train.device_ids())
    on_gpu = torch.cuda.is_available()
    # On CPU the process group must be gloo (FACTS.md); a single process needs none.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not on_gpu else []
    plugin = None
    strategy = config.sft_train.strategy_args.strategy_name
    if strategy == "deepspeed_train":
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(config))
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[config.sft_train.model_args.dtype]
    tracking = config.track_with if config.track_with != "none" else None
    log_dir = config.tracker_kwargs.get("log_dir", os.path.join(config.logs_dir(), "tensorboard"))
    if strategy == "fsdp2_train":
        mixed = "no"  # FSDP2 casts through its own MixedPrecisionPolicy (see SFTWorker._shard)
    if plugin is not None and not on_gpu:
        # Accelerate drops DeepSpeed without a word when told the run is on CPU (cpu=True, or the
        # ACCELERATE_USE_CPU that `accelerate launch --cpu` and CPU test launches set): leave both out, and
        # DeepSpeed runs on the CPU over gloo (FACTS.md).
        os.environ.pop("ACCELERATE_USE_CPU", None)
    return Accelerator(
        cpu=not on_gpu and plugin is None,
        mixed_precision=None if plugin is not None else mixed,
        gradient_accumulation_steps=config.sft_train.training_args.gradient_accumulation_steps,
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
        log_with=tracking,
        project_dir=log_dir,
    )


class SFTWorker:
    """Holds the model, optimizer and data of one process and runs the seed's worker operations."""

    def __init__(self, config: SFTConfig, accelerator, tokenizer, train_data, val_data=None):
        self.config, self.accelerator, self.tokenizer = config, accelerator, tokenizer
        self.train_data, self.val_data = train_data, val_data
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.model = self.optimizer = None
        self.step = 0
        self.total_steps = 0
        self.params_sharded = False
        self.fsdp2 = False

    # ----- initialize ------------------------------------------------------------------------------
    def initialize(self, total_steps: int) -> dict:
        """Build the strategy and load the model; returns metrics (parameter count, load time)."""
        start = time.perf_counter()
        config, model_args = self.config, self.config.sft_train.model_args
        attn = attention_implementation(model_args.attn_implementation, torch.cuda.is_available())
        model = load_model(config.pretrain, "fp32", attn, from_scratch=model_args.from_scratch,
                           model_config=model_args.model_config, seed=config.seed)
        if model_args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.parameter_count = sum(p.numel() for p in model.parameters())
        self.model_config = model.config
        self.total_steps = total_steps
        self.fsdp2 = config.sft_train.strategy_args.strategy_name == "fsdp2_train"
        if "position_ids" in self.train_data.column_names:
            from sft.packing import check_packing_backend

            check_packing_backend(attn, model.config.use_cache)
        if self.fsdp2:
            model = self._shard(model)  # before the optimizer: sharding replaces the parameters
        args = config.sft_train.training_args
        decay, no_decay = [], []
        for name, parameter in model.named_parameters():
            (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
        groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      eps=args.adam_epsilon)
        if self.fsdp2:
            self.model, self.optimizer = model, optimizer  # Accelerate would wrap an FSDP2 model in DDP
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        plugin = self.accelerator.state.deepspeed_plugin
        if (plugin is not None) != (config.sft_train.strategy_args.strategy_name == "deepspeed_train"):
            raise RuntimeError(f"strategy {config.sft_train.strategy_args.strategy_name} but Accelerate runs "
                               f"{self.accelerator.distributed_type}: the run would not be what the config says")
        if not self.fsdp2 and plugin is None:
            # The checkpoint's HF export holds the weights; Accelerate's own copy would double its size.
            self.accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
            self.accelerator.register_load_state_pre_hook(self._load_exported_weights)
        # With sharded parameters every rank must take part in every forward pass.
        self.params_sharded = self.fsdp2 or (plugin is not None and plugin.zero_stage == 3)
        return {"parameters": self.parameter_count, "attention": attn, "init_seconds": time.perf_counter() - start}

    def _shard(self, model):
        """FSDP2: shard each decoder layer and the root over all processes (torch's fully_shard; gloo on CPU)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        device = self.accelerator.device
        model.to(device)
        mesh = init_device_mesh(device.type, (self.accelerator.num_processes,))
        options = {"mesh": mesh}
        dtype = self.config.sft_train.model_args.dtype
        if dtype != "fp32":
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bf16" else torch.float16,
                                                        reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, **options)
        fully_shard(model, **options)
        return model

    # ----- helpers ---------------------------------------------------------------------------------
    def _batch(self, dataset, indices: list[int]) -> tuple[dict[str, torch.Tensor], int, int]:
        """A micro-batch on this process's device, its number of real (non-pad) tokens and of samples."""
        columns = dataset[indices]
        multiple = self.config.sft_train.data_args.pad_to_multiple_of
        if "position_ids" in columns:  # packed rows: positions restart per sample, no attention mask
            rows = [{"input_ids": i, "labels": l, "position_ids": p}
                    for i, l, p in zip(columns["input_ids"], columns["labels"], columns["position_ids"])]
            batch = packed_collate(rows, self.pad_id, multiple)
        else:
            samples = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
            batch = pad_collate(samples, self.pad_id, multiple)
        tokens = sum(len(ids) for ids in columns["input_ids"])
        samples = sum(columns["num_samples"]) if "num_samples" in columns else len(indices)
        return {key: value.to(self.accelerator.device) for key, value in batch.items()}, tokens, samples

    def _all_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction="sum").tolist()

    def set_lr(self, step: int) -> float:
        args = self.config.sft_train.training_args
        from sft.schedule import warmup_steps_for

        warmup = warmup_steps_for(self.total_steps, args.warmup_steps, args.warmup_ratio)
        lr = lr_at(step, self.total_steps, args.learning_rate, warmup, args.lr_scheduler_type, args.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # ----- train_step ------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[list[int]]) -> dict:
        """One optimizer step over this rank's micro-batches (sample indices); returns its metrics."""
        accelerator, model = self.accelerator, self.model
        timings = {"data": 0.0, "forward_backward": 0.0, "optimizer": 0.0}
        start = time.perf_counter()
        built = [self._batch(self.train_data, indices) for indices in micro_batches]
        batches = [batch for batch, _, _ in built]
        local_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        local_tokens = sum(tokens for _, tokens, _ in built)
        local_padded = sum(b["input_ids"].numel() for b in batches)
        local_samples = sum(samples for _, _, samples in built)
        targets, tokens, padded, samples = self._all_sum([local_targets, local_tokens, local_padded, local_samples])
        timings["data"] = time.perf_counter() - start
        lr = self.set_lr(self.step)
        scale = accelerator.num_processes * len(batches) / max(targets, 1.0)
        model.train()
        loss_total = 0.0
        skipped = False
        start = time.perf_counter()
        for batch in batches:
            with accelerator.accumulate(model):
                if skipped:  # keep Accelerate's accumulation count aligned; nothing to compute
                    continue
                summed, _ = loss_sum(model, batch)
                if not self._finite(summed):
                    skipped = self._handle_nan()
                    continue
                accelerator.backward(summed * scale)
                loss_total += float(summed.detach())
        timings["forward_backward"] = time.perf_counter() - start
        start = time.perf_counter()
        grad_norm = self._optimizer_step(skipped)
        timings["optimizer"] = time.perf_counter() - start
        self.step += 1
        loss = self._all_sum([loss_total])[0] / max(targets, 1.0)
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": tokens, "padded_tokens": padded,
                "target_tokens": targets, "samples": samples, "skipped": skipped, **timings}

    def _finite(self, value: torch.Tensor) -> bool:
        flag = 0.0 if torch.isfinite(value.detach()).all() else 1.0
        return self._all_sum([flag])[0] == 0.0

    def _handle_nan(self) -> bool:
        if self.config.sft_train.training_args.on_nan == "error":
            raise FloatingPointError(
                f"step {self.step + 1}: the loss is NaN or infinite; stopping (lower the learning rate, check the data, "
                "or set sft_train.training_args.on_nan: skip)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _optimizer_step(self, skipped: bool) -> float:
        accelerator = self.accelerator
        if accelerator.state.deepspeed_plugin is not None:
            # DeepSpeed clipped and stepped inside the last backward.
            norm = accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        if skipped:
            return float("nan")
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        if self.fsdp2:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        else:
            norm = accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # ----- val_step --------------------------------------------------------------------------------
    @torch.no_grad()
    def val_step(self, batches: list[list[int]]) -> dict:
        """Forward over this rank's validation batches; token-weighted loss over all ranks, nothing dropped."""
        start = time.perf_counter()
        self.model.eval()
        total, count = 0.0, 0
        # Ranks may hold different numbers of batches; ZeRO-3 needs every rank in every forward, so all
        # ranks run the longest count, the extra ones on an empty batch of the first sample masked out.
        steps = int(self._all_max(len(batches)))
        for index in range(steps):
            indices = batches[index] if index < len(batches) else [0]
            batch, _, _ = self._batch(self.val_data, indices)
            if index >= len(batches):
                batch["labels"].fill_(-100)
            summed, targets = loss_sum(self.model, batch)
            total += float(summed)
            count += targets
        total, count = self._all_sum([total, float(count)])
        return {"val_loss": total / max(count, 1.0), "val_tokens": count, "eval_seconds": time.perf_counter() - start}

    def _all_max(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.gather(tensor).max())

    # ----- do_checkpoint ---------------------------------------------------------------------------
    def do_checkpoint(self, state: dict) -> dict:
        """Save an HF model + resumable state atomically at <output_dir>/sft_train/checkpoint-<step>/."""
        start = time.perf_counter()
        config, accelerator = self.config, self.accelerator
        staging = ckpt.staging_dir(config.output_dir, self.step)
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        accelerator.wait_for_everyone()
        accelerator.save_state(os.path.join(staging, "training_state"))  # with FSDP2: the RNG states only
        if self.fsdp2:
            self._save_sharded(os.path.join(staging, "training_state", "fsdp2"))
        model_folder = ckpt.model_dir(staging, config.cluster_name)
        weights = self._full_state_dict()  # every rank takes part (ZeRO-3 and FSDP2 gather)
        if accelerator.is_main_process:
            (self.model if self.fsdp2 else accelerator.unwrap_model(self.model)).save_pretrained(
                model_folder, state_dict=weights, save_function=accelerator.save, safe_serialization=True)
            self.tokenizer.save_pretrained(model_folder)
        accelerator.wait_for_everyone()
        final = None
        if accelerator.is_main_process:
            final = ckpt.finish(config.output_dir, self.step, state)
            ckpt.rotate(config.output_dir, config.sft_train.training_args.save_total_limit)
        accelerator.wait_for_everyone()
        return {"checkpoint_seconds": time.perf_counter() - start, "checkpoint": final or ckpt.checkpoint_dir(config.output_dir, self.step)}

    def load_checkpoint(self, path: str) -> dict:
        """Restore model, optimizer and RNG states from a complete checkpoint; returns its trainer state."""
        self.accelerator.load_state(os.path.join(path, "training_state"))
        if self.fsdp2:
            self._load_sharded(os.path.join(path, "training_state", "fsdp2"))
        state = ckpt.read_state(path)
        self.step = state["step"]
        return state

    def _load_exported_weights(self, models: list, training_state: str) -> None:
        """Accelerate's load-state hook: the weights come from the checkpoint's HF export, bit for bit."""
        if any(name.startswith("model") and name.endswith((".safetensors", ".bin")) for name in os.listdir(training_state)):
            return  # a checkpoint that also kept Accelerate's copy: Accelerate loads it
        from safetensors.torch import load_file

        checkpoint = os.path.dirname(training_state.rstrip(os.sep))
        folder = ckpt.model_dir(checkpoint, self.config.cluster_name)
        if not os.path.isdir(folder):
            found = [name for name in os.listdir(checkpoint) if os.path.isdir(os.path.join(checkpoint, name))
                     and name != "training_state"]
            raise ConfigError(f"cluster_name: checkpoint {checkpoint} keeps its model in {found} but this run's "
                              f"cluster_name is {self.config.cluster_name!r}; resume with the run's own cluster_name")
        index = os.path.join(folder, "model.safetensors.index.json")
        files = ["model.safetensors"]
        if os.path.exists(index):
            with open(index, encoding="utf-8") as handle:
                files = sorted(set(json.load(handle)["weight_map"].values()))
        model = self.accelerator.unwrap_model(models.pop())
        device = self.accelerator.device
        device = "cpu" if device.type == "cpu" else str(device)  # safetensors refuses "cpu:0" (CPU ranks' device)
        loaded: set = set()
        for name in files:  # shard by shard, straight onto the device: one shard in memory at a time
            weights = load_file(os.path.join(folder, name), device=device)
            model.load_state_dict(weights, strict=False)
            loaded.update(weights)
            del weights
        for parameter, names in _parameter_names(model).items():
            if not loaded.intersection(names):  # tied parameters are saved once, under one of their names
                raise RuntimeError(f"checkpoint {folder} has no weights for {' / '.join(names)}")

    def _full_state_dict(self) -> dict:
        if not self.fsdp2:
            return self.accelerator.get_state_dict(self.model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _save_sharded(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)

    def _load_sharded(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=folder)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    # ----- demo ------------------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, prompts: list[str], template, max_new_tokens: int) -> list[str]:
        """Greedy answers of the live model to ``prompts`` (main process; not under ZeRO-3)."""
        model = self.model if self.fsdp2 else self.accelerator.unwrap_model(self.model)
        model.eval()
        answers = []
        for prompt in prompts:
            text = template.generation_prompt([{"role": "user", "content": prompt}])
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(self.accelerator.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=self.pad_id, eos_token_id=self._stop_ids(template), use_cache=True)
            new = out[0, ids.shape[1]:].tolist()
            stops = set(self._stop_ids(template))
            end = next((i for i, token in enumerate(new) if token in stops), len(new))
            answers.append(self.tokenizer.decode(new[:end], skip_special_tokens=False))
        return answers

    def _stop_ids(self, template) -> list[int]:
        stops = {self.tokenizer.eos_token_id}
        for token in ("<|im_end|>", "<|eot_id|>", getattr(template, "end_of_turn", None)):
            if token and token in self.tokenizer.get_vocab():
                stops.add(self.tokenizer.convert_tokens_to_ids(token))
        return [i for i in stops if i is not None]


def _parameter_names(model) -> dict:
    """Each parameter (tied ones once) -> all the names it goes by."""
    names: dict = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(parameter, []).append(name)
    return names


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA allocator peak on a GPU, max RSS on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak_flops(config: SFTConfig) -> Optional[float]:
    """Peak FLOP/s of one device for MFU: peak_tflops when set, else a known GPU's bf16 dense peak."""
    if config.peak_tflops > 0:
        return config.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if "H100" in name or "H200" in name:
            return 790e12  # measured bf16 dense matmul peak on this workplace's H100/H200
    return None
