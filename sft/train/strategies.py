"""Distribution strategies: one class per ``strategy_name``, behind one interface, registered in STRATEGIES.

The worker (sft/train/worker.py) calls only the ``Strategy`` interface; nothing outside this module branches on
the strategy. A strategy decides:

    what                           ddp_train           deepspeed_train                 fsdp2_train
    Accelerator                    DDP (gloo on CPU)   DeepSpeed plugin (ZeRO 0-3)     none: torch fully_shard
    prepare model + optimizer      accelerator         accelerator (DeepSpeed engine)  shard, then the optimizer
    optimizer step                 clip, step          inside the last backward        clip (DTensor norm), step
    full state dict (HF export)    accelerator         accelerator (ZeRO-3 gathers)    get_model_state_dict
    training state on disk         optimizer + RNG     DeepSpeed's partitioned copy    torch.distributed.checkpoint
    resume on another process count  yes             no (partitioned per process)    yes (DCP reshards)
    on_nan: skip                   yes                 no (steps inside backward)      no

Adding a strategy is one subclass, one line in STRATEGIES and its entry in strategy_options.OPTIONS. A model
transform (LoRA) wraps the model before ``prepare`` and is exported by ``full_state_dict``; the optimizer takes only trainable parameters.

What each strategy accepts in strategy_config (and whether it can drop a step) is the table in
sft/config/strategy_options.py, which the config checks itself with; this module imports no torch at the top.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Callable, ClassVar

from sft.train import checkpoint as ckpt
from sft.config import SFTConfig
from sft.errors import ConfigError
from sft.config.strategy_options import OPTIONS, SKIPS_A_STEP
from sft.train.metrics import require_trackers, tensorboard_dir


class Strategy:
    """How one process holds, steps, saves and loads the model; the worker calls nothing else."""

    name: ClassVar[str]
    options: ClassVar[dict[str, str]] = {}  # strategy_config key -> what it means
    supports_nan_skip: ClassVar[bool] = False  # can an optimizer step be dropped after backward started?
    reshards_on_load: ClassVar[bool] = True  # does its training state load into another process count?
    needs_process_group: ClassVar[bool] = False  # a torch.distributed group even with one process
    uses_deepspeed: ClassVar[bool] = False  # the engine Accelerate must report

    def __init__(self, config: SFTConfig):
        self.config = config
        self.accelerator = self.model = self.optimizer = None

    def accelerator_kwargs(self, on_gpu: bool) -> dict:
        mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[self.config.sft_train.model_args.dtype]
        return {"cpu": not on_gpu, "mixed_precision": mixed}

    def prepare(self, accelerator, model, make_optimizer: Callable) -> tuple[Any, Any]:
        """Wrap the model for this strategy and build its optimizer (``make_optimizer(model)``)."""
        self.accelerator = accelerator
        self.model, self.optimizer = accelerator.prepare(model, make_optimizer(model))
        return self.model, self.optimizer

    def check_engine(self, accelerator) -> None:
        """Refuse a run whose Accelerate engine (e.g. from an accelerate config file) is not this strategy."""
        if (accelerator.state.deepspeed_plugin is not None) != self.uses_deepspeed:
            raise ConfigError(f"sft_train.strategy_args.strategy_name: {self.name}, but Accelerate runs "
                              f"{accelerator.distributed_type}; launch without an accelerate config that picks another "
                              "engine, or set strategy_name to match it")

    @property
    def params_sharded(self) -> bool:
        """Are parameters split across processes (every process must then take part in every forward)?"""
        return False

    # ----- step ------------------------------------------------------------------------------------
    def backward(self, loss) -> None:
        self.accelerator.backward(loss)

    def step(self) -> float:
        """Clip, step and clear the gradients; the gradient norm before clipping."""
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self._max_norm())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def discard_step(self) -> None:
        """Drop this step's gradients (on_nan: skip); only strategies with supports_nan_skip get here."""
        self.optimizer.zero_grad(set_to_none=True)

    def _max_norm(self) -> float:
        return self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")

    # ----- save and load ---------------------------------------------------------------------------
    def full_state_dict(self) -> dict:
        """The whole model's weights on the main process, for the HF export (every process must call it)."""
        return self.accelerator.get_state_dict(self.model)

    def save(self, folder: str) -> None:
        """Write what resuming needs besides the HF export: optimizer, RNG states (and weights, if not exported)."""
        self.accelerator.save_state(folder)

    def load(self, folder: str) -> None:
        self.accelerator.load_state(folder)


class DDPStrategy(Strategy):
    """Data parallel: every process holds the whole model; gradients are averaged in backward."""

    name = "ddp_train"
    supports_nan_skip = name in SKIPS_A_STEP

    def prepare(self, accelerator, model, make_optimizer):
        super().prepare(accelerator, model, make_optimizer)
        # The checkpoint's HF export holds the weights; Accelerate's own copy would double its size.
        accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
        accelerator.register_load_state_pre_hook(self._load_exported_weights)
        return self.model, self.optimizer

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
        if ckpt.is_adapter(folder):  # LoRA: the base comes from pretrain; the adapter from the checkpoint
            from sft.train.lora import load_adapter_weights

            load_adapter_weights(self.accelerator.unwrap_model(models.pop()), folder, self._load_device())
            return
        index = os.path.join(folder, "model.safetensors.index.json")
        files = ["model.safetensors"]
        if os.path.exists(index):
            with open(index, encoding="utf-8") as handle:
                files = sorted(set(json.load(handle)["weight_map"].values()))
        model = self.accelerator.unwrap_model(models.pop())
        device = self._load_device()
        loaded: set = set()
        for name in files:  # shard by shard, straight onto the device: one shard in memory at a time
            weights = load_file(os.path.join(folder, name), device=device)
            model.load_state_dict(weights, strict=False)
            loaded.update(weights)
            del weights
        names: dict = {}  # each parameter (tied ones once) -> all the names it goes by
        for name, parameter in model.named_parameters(remove_duplicate=False):
            names.setdefault(parameter, []).append(name)
        for aliases in names.values():
            if not loaded.intersection(aliases):  # tied parameters are saved once, under one of their names
                raise ckpt.CheckpointError(f"checkpoint {folder} has no weights for {' / '.join(aliases)}; it is "
                                           "incomplete or from another model")


    def _load_device(self) -> str:
        device = self.accelerator.device
        return "cpu" if device.type == "cpu" else str(device)  # safetensors refuses "cpu:0" (CPU ranks' device)


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO through Accelerate's plugin; clipping and the optimizer step happen inside backward."""

    name = "deepspeed_train"
    options = OPTIONS[name]
    reshards_on_load = False  # ZeRO partitions are written per process
    needs_process_group = True  # DeepSpeed's engine talks to its group even alone
    uses_deepspeed = True

    def deepspeed_config(self) -> dict:
        """The DeepSpeed config of this run, from strategy_config (or the JSON file it names)."""
        import torch

        options = dict(self.config.sft_train.strategy_args.strategy_config)
        args = self.config.sft_train.training_args
        if "deepspeed_config" in options:
            with open(options["deepspeed_config"], encoding="utf-8") as handle:
                base = json.load(handle)
        else:
            zero: dict = {"stage": int(options.get("zero_stage", 2))}
            for key in ("offload_optimizer", "offload_param"):
                if options.get(key):
                    zero[key] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
            if zero["stage"] == 3:
                zero["stage3_gather_16bit_weights_on_model_save"] = True
            base = {"zero_optimization": zero}
            if "offload_optimizer" in zero:
                base["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW is the client optimizer
        dtype = self.config.sft_train.model_args.dtype
        # The run config owns batch shape, clipping and precision; a JSON file's values for them are replaced.
        base.update({
            "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "gradient_clipping": self.config.max_grad_norm if self.config.max_grad_norm > 0 else 0.0,
            "bf16": {"enabled": dtype == "bf16"},
            "fp16": {"enabled": dtype == "fp16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        })
        return base

    def accelerator_kwargs(self, on_gpu: bool) -> dict:
        from accelerate.utils import DeepSpeedPlugin

        if not on_gpu:
            # Accelerate drops DeepSpeed without a word when told the run is on CPU (cpu=True, or the
            # ACCELERATE_USE_CPU that `accelerate launch --cpu` and CPU test launches set): leave both out, and
            # DeepSpeed runs on the CPU over gloo (FACTS.md).
            os.environ.pop("ACCELERATE_USE_CPU", None)
        # DeepSpeed's config owns precision (bf16/fp16 above).
        return {"cpu": False, "mixed_precision": None,
                "deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=self.deepspeed_config())}

    @property
    def params_sharded(self) -> bool:
        return self.deepspeed_config().get("zero_optimization", {}).get("stage") == 3

    def step(self) -> float:
        # DeepSpeed clipped and stepped inside the last backward of the step.
        norm = self.accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")


class FSDP2Strategy(Strategy):
    """torch FSDP2: each decoder layer and the root sharded over all processes (``fully_shard``; gloo on CPU)."""

    name = "fsdp2_train"
    needs_process_group = True  # the device mesh is built on the default group, also of one process

    def accelerator_kwargs(self, on_gpu: bool) -> dict:
        return {"cpu": not on_gpu, "mixed_precision": "no"}  # FSDP2 casts through its MixedPrecisionPolicy

    def prepare(self, accelerator, model, make_optimizer):
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.accelerator = accelerator
        model.to(accelerator.device)
        options: dict = {"mesh": init_device_mesh(accelerator.device.type, (accelerator.num_processes,))}
        dtype = self.config.sft_train.model_args.dtype
        if dtype != "fp32":
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bf16" else torch.float16,
                                                        reduce_dtype=torch.float32)
        for layer in self._decoder_layers(model):
            fully_shard(layer, **options)
        fully_shard(model, **options)
        # The optimizer is built on the sharded parameters; Accelerate's prepare would wrap the model in DDP.
        self.model, self.optimizer = model, make_optimizer(model)
        return self.model, self.optimizer

    @staticmethod
    def _decoder_layers(model) -> list:
        """The repeated blocks to shard one by one: modules of the classes the model names as not to be split
        (Qwen2DecoderLayer, ...), found through any wrapper (a PEFT model keeps the base's modules)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        kinds = set(getattr(base, "_no_split_modules", None) or [])
        layers = [module for module in model.modules() if type(module).__name__ in kinds]
        if not layers:
            raise ConfigError(f"fsdp2_train: cannot find the decoder layers of {type(base).__name__} (it names no "
                              "_no_split_modules); use ddp_train or deepspeed_train")
        return layers

    @property
    def params_sharded(self) -> bool:
        return True

    def step(self) -> float:
        import torch

        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self._max_norm())
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor over the shards
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def full_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.accelerator.save_state(folder)  # the RNG states: the model was not prepared by Accelerate
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.path.join(folder, "fsdp2"))

    def load(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        self.accelerator.load_state(folder)
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=os.path.join(folder, "fsdp2"))  # reshards to this run's process count
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (DDPStrategy, DeepSpeedStrategy, FSDP2Strategy)}

def make_strategy(config: SFTConfig) -> Strategy:
    return STRATEGIES[config.sft_train.strategy_args.strategy_name](config)


# ----- the Accelerator -----------------------------------------------------------------------------

def apply_device_mapping(device_ids) -> None:
    """Restrict this process to device_mapping's GPUs (before CUDA starts); each local rank takes one of them."""
    if device_ids is None:
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if local_world > len(device_ids):
        raise ConfigError(f"sft_train.device_mapping names {len(device_ids)} device(s) but {local_world} processes run "
                          "on this machine; launch at most that many (--num_processes) or widen device_mapping")
    wanted = ",".join(str(i) for i in device_ids)
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    if current is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = wanted
    elif current != wanted:
        raise ConfigError(f"sft_train.device_mapping ({wanted}) disagrees with CUDA_VISIBLE_DEVICES={current}; "
                          "set one of them")


# What a run sets in os.environ for itself, put back by ``finish`` as the process started, so that a later run in this
# process, or a process it starts, is not steered by it: Accelerate records an Accelerator's engine there and builds
# a later Accelerator without a plugin from it (on GPU, a DDP run after a DeepSpeed one would get DeepSpeed), and
# _single_process_group_env sets torchrun's variables. A launcher's values are there at start, so they stay.
_LAUNCH_VARIABLES = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                     "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_AT_START = {name: os.environ.get(name) for name in _LAUNCH_VARIABLES}


def _restore_launch_variables() -> None:
    for name, value in _AT_START.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _single_process_group_env() -> None:
    """What a launcher sets for a group of one (torchrun's variables), so DeepSpeed and FSDP2 run alone too."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(name, value)


def build_accelerator(config: SFTConfig, strategy: Strategy):
    """The Accelerator of this run: the strategy's engine and precision, gloo on CPU, the tracker."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    apply_device_mapping(config.sft_train.device_ids())
    on_gpu = torch.cuda.is_available()
    if strategy.needs_process_group and "LOCAL_RANK" not in os.environ:  # one process, started without a launcher
        _single_process_group_env()
    grouped = int(os.environ.get("WORLD_SIZE", "1")) > 1 or strategy.needs_process_group
    # On CPU the process group must be gloo (FACTS.md); a single DDP process needs none.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if grouped and not on_gpu else []
    require_trackers(config)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.sft_train.training_args.gradient_accumulation_steps,
        kwargs_handlers=handlers,
        log_with=config.trackers() or None,
        project_dir=tensorboard_dir(config),
        **strategy.accelerator_kwargs(on_gpu),
    )
    strategy.check_engine(accelerator)
    return accelerator


def finish(accelerator) -> None:
    """End the run's trackers and meet the other processes. With several processes the process group stays up and
    the script ends with ``leave_after_finish``; a lone process takes its group (if any) down, so that a caller
    running training in its own process can start another run. Not Accelerate's end_training: it destroys the
    group, after which leave_after_finish saw none and let the interpreter shut down with gloo's threads alive
    (a run loop freeing a tensor then takes the GIL during finalization and aborts: caught with a terminate hook,
    4 of 30 two-node Slurm runs)."""
    import torch.distributed as dist

    for tracker in accelerator.trackers:  # end_training's first half: its second takes the process group down
        tracker.finish()
    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        if accelerator.num_processes == 1:
            dist.destroy_process_group()
    _restore_launch_variables()


def leave_after_finish(code=0) -> None:
    """End a script's process with exit status ``code`` (as ``sys.exit`` reads it) and no interpreter shutdown while
    a process group is up; return otherwise. Why: gloo's worker threads (pt_gloo_runloop) live as long as the
    ProcessGroup objects, which outlive destroy_process_group (DDP's reducer, FSDP's mesh and DeepSpeed hold them:
    every ZeRO-3 parameter's ds_process_group, deepspeed.utils.groups, the engine). Destroyed with work in flight,
    or freeing a tensor during interpreter shutdown (Python ends such a thread with pthread_exit, which unwinds
    through a noexcept destructor), they call std::terminate: "terminate called without an active exception",
    SIGABRT, exit -6 after a finished and saved run. Trackers were ended and logs flushed by ``finish``."""
    import logging
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if isinstance(code, str):  # sys.exit("message") prints it and exits 1
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0 if code is None else code)
