"""The SFT worker: ROLL's worker operations (initialize, train_step, val_step, do_checkpoint) on Accelerate.

The strategy object (sft/train/strategies.py) prepares, steps, saves and loads; the worker runs the same code
whatever the strategy. What a step trains on comes from sft/train/loader.py; scripts/train.py owns the loop.

Loss normalisation (docs/guarantees.md): an optimizer step's loss is the mean over all of its target tokens,
across accumulation micro-batches and ranks. Before the first backward of a step, the target-token
count N of the whole step is all-reduced; each micro-batch then backpropagates
``loss_sum * world * accumulation / N``, which undoes the mean over ranks (DDP, ZeRO, FSDP2) and the division
by accumulation steps (Accelerate, DeepSpeed) so the gradient is exactly d(sum of token losses / N).
"""

from __future__ import annotations

import math
import os
import pathlib
import shutil
import time
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object

from sft.train import checkpoint as ckpt
from sft.config import SFTConfig
from sft.config.sections import is_jinja_file
from sft.errors import IGNORE_INDEX, UserError
from sft.generation import StopRule, conversation, generate_answer, generate_options, stop_rule
from sft.train.answers import ScoredAnswer, answer_case, left_padded
from sft.train.loader import StepBatch, collate_rows
from sft.train.architectures import Architecture
from sft.train.attention import watch_packed_rows
from sft.train.hybrid import separate_samples
from sft.train.lora import adapted_modules, apply_lora, check_quantization, check_saved, lora_enabled, quantization_config
from sft.train.metrics import StepResult, ValResult, add_counts
from sft.train.modeling import attention_implementation, forward_loss, load_model, load_model_config
from sft.train.moe import Router, active_parameters
from sft.train.runstate import RunState
from sft.train.strategies import Strategy, finish


class NonFiniteLoss(UserError):
    """A step's loss is NaN or infinite and on_nan is error."""


@dataclass(frozen=True)
class ModelInfo:
    """What initialize loaded, for the run log."""

    parameters: int
    trainable: int
    attention: str
    architecture: str  # sft.train.architectures.Architecture.describe()
    per_sample_mixers: int  # recurrent / convolution layers run per sample on packed rows (sft/train/hybrid.py)
    router_aux_loss_coef: float | None  # None: no router loss
    adapters: str  # sft.train.lora.adapted_modules: what carries LoRA adapters ("" without LoRA)
    seconds: float


class SFTWorker:
    """Holds the model, optimizer and data of one process and runs ROLL's worker operations."""

    def __init__(self, config: SFTConfig, accelerator, strategy: Strategy, tokenizer, train_data, val_data=None):
        self.config, self.accelerator, self.strategy, self.tokenizer = config, accelerator, strategy, tokenizer
        self.train_data, self.val_data = train_data, val_data
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.model = self.optimizer = self.model_config = None
        self.router: Router | None = None  # an MoE model's router loss (sft/train/moe.py)
        self.parameter_count = self.active_parameter_count = 0  # active: what a token passes through (MoE)
        template = config.template_name()  # a Jinja-file template's text goes into every checkpoint
        self.template_text = pathlib.Path(template).read_text(encoding="utf-8") if is_jinja_file(template) else None

    # ----- initialize ------------------------------------------------------------------------------
    def initialize(self) -> "ModelInfo":
        """Check the architecture, load the model and let the strategy prepare it."""
        start = time.perf_counter()
        config, model_args = self.config, self.config.sft_train.model_args
        packed = "position_ids" in self.train_data.column_names
        # Decided from config.json alone, before any weight is loaded: refusals cost nothing.
        architecture = Architecture.of(load_model_config(config.pretrain, model_args.model_config, model_args.from_scratch))
        if packed:
            architecture.check_packing()
        coefficient = architecture.router_coefficient(model_args.router_aux_loss_coef)
        attn = attention_implementation(architecture.attention(model_args.attn_implementation, packed))
        check_quantization(model_args, torch.cuda.is_available())
        model = load_model(config.pretrain, "fp32", attn, from_scratch=model_args.from_scratch,
                           model_config=model_args.model_config, seed=config.seed,
                           quantization=quantization_config(model_args))
        mixers = []
        if packed:
            from sft.data.packing import check_packing_backend

            check_packing_backend(attn, model.config.use_cache, config.sft_train.training_args.per_device_train_batch_size)
            watch_packed_rows(model)
            mixers = separate_samples(model, architecture.stateful)
        if architecture.router_loss:
            self.router = Router.of(model, architecture.experts, architecture.experts_per_token, coefficient)
        if model_args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        adapters = ""
        if lora_enabled(model_args):
            model = apply_lora(model, model_args, architecture.experts)
            adapters = adapted_modules(model)
        self.parameter_count = sum(p.numel() for p in model.parameters())
        self.active_parameter_count = active_parameters(model, architecture.experts, architecture.experts_per_token)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.model_config = model.config
        self.model, self.optimizer = self.strategy.prepare(self.accelerator, model, self._optimizer_for)
        return ModelInfo(parameters=self.parameter_count, trainable=trainable, attention=attn,
                         architecture=architecture.describe(), per_sample_mixers=len(mixers),
                         router_aux_loss_coef=coefficient if architecture.router_loss else None, adapters=adapters,
                         seconds=time.perf_counter() - start)

    def _optimizer_for(self, model) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters; no weight decay on biases and norms."""
        args = self.config.sft_train.training_args
        decay, no_decay = [], []
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
        groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                 eps=args.adam_epsilon)

    # ----- collectives -----------------------------------------------------------------------------
    def all_sum(self, values: list[float]) -> list[float]:
        """Each value summed over all processes (float64)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction="sum").tolist()

    def any_process(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any of them."""
        return self.all_sum([1.0 if flag else 0.0])[0] > 0

    # ----- train_step ------------------------------------------------------------------------------
    def train_step(self, batch: StepBatch, lr: float) -> StepResult:
        """One optimizer step over this process's micro-batches at learning rate ``lr``."""
        accelerator, model = self.accelerator, self.model
        start = time.perf_counter()
        micro_batches = [{key: value.to(accelerator.device, non_blocking=True) for key, value in micro.items()}
                         for micro in batch.micro_batches]
        targets, tokens, padded, samples = (int(total) for total in self.all_sum(
            [batch.target_tokens, batch.tokens, batch.padded_tokens, batch.samples]))
        data_seconds = time.perf_counter() - start
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        scale = accelerator.num_processes * len(micro_batches) / max(targets, 1)
        router_scale = accelerator.num_processes * len(micro_batches) / max(tokens, 1)  # sft/train/moe.py
        model.train()
        local_loss, local_correct, skipped, router = 0.0, 0, False, RouterWindow()
        start = time.perf_counter()
        for micro in micro_batches:
            with accelerator.accumulate(model):
                if skipped:  # keep Accelerate's accumulation count aligned; nothing to compute
                    continue
                forward = forward_loss(model, micro, self.config.sft_train.model_args.loss_chunk_size, self.router)
                objective = forward.loss_sum * scale
                if forward.router is not None and self.router.coefficient:
                    objective = objective + forward.router.weighted_sum * (self.router.coefficient * router_scale)
                if self.any_process(not bool(torch.isfinite(objective.detach()))):
                    skipped = self._on_nan(batch.step)
                    continue
                self.strategy.backward(objective)
                local_loss += float(forward.loss_sum.detach())
                local_correct = add_counts(local_correct, forward.correct)
                router.add(forward.router)
        forward_backward_seconds = time.perf_counter() - start
        start = time.perf_counter()
        if skipped:
            self.strategy.discard_step()
        grad_norm = float("nan") if skipped else self.strategy.step()
        loss_total, correct = self.all_sum([local_loss, _unknown_as_nan(local_correct)])
        return StepResult(loss_sum=loss_total, target_tokens=targets, tokens=tokens, correct_tokens=_count(correct),
                          **self._router_totals(router),
                          padded_tokens=padded, samples=samples, grad_norm=grad_norm, lr=lr, skipped=skipped,
                          data_seconds=data_seconds, forward_backward_seconds=forward_backward_seconds,
                          optimizer_seconds=time.perf_counter() - start)

    def _router_totals(self, window: "RouterWindow") -> dict:
        """The step's router loss sum, its tokens and the experts' counts, summed over processes (empty: no router)."""
        if self.router is None:
            return {}
        totals = self.all_sum([window.weighted_sum, float(window.tokens)] + window.counts.flatten().tolist())
        counts = torch.tensor(totals[2:], dtype=torch.float64).reshape(window.counts.shape)
        return {"aux_sum": totals[0], "router_tokens": int(totals[1]), "expert_counts": counts}

    def _on_nan(self, step: int) -> bool:
        if self.config.sft_train.training_args.on_nan == "error":
            raise NonFiniteLoss(f"step {step + 1}: the loss is NaN or infinite; stopping (lower the learning rate, check "
                                "the data, or set sft_train.training_args.on_nan: skip)")
        return True

    # ----- val_step --------------------------------------------------------------------------------
    @torch.no_grad()
    def val_step(self, batches: list[list[int]]) -> ValResult:
        """Forward over this rank's validation batches; token-weighted loss and token accuracy over all ranks,
        nothing dropped."""
        start = time.perf_counter()
        self.model.eval()
        total, count, correct = 0.0, 0, 0
        # Ranks may hold different numbers of batches; with sharded parameters every rank must take part in
        # every forward, so all ranks run the longest count, the extra ones on the first sample masked out.
        steps = self._longest(len(batches))
        multiple = self.config.sft_train.data_args.pad_to_multiple_of
        for index in range(steps):
            batch = collate_rows(self.val_data[batches[index] if index < len(batches) else [0]], self.pad_id, multiple)
            if index >= len(batches):
                batch["labels"].fill_(IGNORE_INDEX)
            forward = forward_loss(self.model, {key: value.to(self.accelerator.device) for key, value in batch.items()},
                                   self.config.sft_train.model_args.loss_chunk_size)
            total += float(forward.loss_sum)
            count += forward.targets
            correct = add_counts(correct, forward.correct)
        total, count, correct = self.all_sum([total, float(count), _unknown_as_nan(correct)])
        return ValResult(loss=total / max(count, 1.0), tokens=int(count), seconds=time.perf_counter() - start,
                         correct_tokens=_count(correct))

    def _longest(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return int(self.accelerator.gather(tensor).max())

    # ----- do_checkpoint ---------------------------------------------------------------------------
    def do_checkpoint(self, state: RunState) -> tuple[str, float]:
        """Save an HF model + the training state atomically at <output_dir>/sft_train/checkpoint-<step>/;
        returns its folder and the seconds it took. A save that fails (disk full, permissions) ends the run on
        every process with one CheckpointError naming the cause and the last good checkpoint, left as it was."""
        start = time.perf_counter()
        config, accelerator = self.config, self.accelerator
        staging, last_good = ckpt.staging_dir(config.output_dir, state.step), ckpt.latest_checkpoint(config.output_dir)
        failed = None
        try:
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
                os.makedirs(staging)
        except OSError as error:
            failed = error
        self._stop_if_save_failed(failed, staging, last_good)
        try:
            self.strategy.save(os.path.join(staging, ckpt.TRAINING_STATE))
        except OSError as error:
            failed = error
        weights = self.strategy.full_state_dict()  # every rank takes part (ZeRO-3 and FSDP2 gather)
        try:
            if accelerator.is_main_process and failed is None:
                folder = ckpt.model_dir(staging, config.cluster_name)
                # A PeftModel writes only the adapter (and additional_target modules), cut from the full state dict.
                accelerator.unwrap_model(self.model).save_pretrained(folder, state_dict=weights, save_function=accelerator.save,
                                                                     safe_serialization=True)
                check_saved(folder)
                self.tokenizer.save_pretrained(folder)
                ckpt.write_template(folder, config.template_name(), config.sft_train.data_args.chat_template_kwargs,
                                    self.template_text)
        except OSError as error:
            failed = error
        self._stop_if_save_failed(failed, staging, last_good)
        try:
            if accelerator.is_main_process:
                ckpt.finish(config.output_dir, state.step, state.to_json())
                args = config.sft_train.training_args
                ckpt.rotate(config.output_dir, args.save_total_limit, args.keep_best)
        except OSError as error:
            failed = error
        self._stop_if_save_failed(failed, staging, last_good)
        return ckpt.checkpoint_dir(config.output_dir, state.step), time.perf_counter() - start

    def _stop_if_save_failed(self, error, staging: str, last_good) -> None:
        """A barrier of the save: when any process failed to write, the unfinished save is removed and every
        process stops (the main one with the first cause, the others quietly)."""
        causes = [cause for cause in gather_object([None if error is None else str(error)]) if cause]
        if not causes:
            return
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        finish(self.accelerator)
        if not self.accelerator.is_main_process:
            raise SystemExit(1)
        raise ckpt.CheckpointError(f"saving {staging} failed: {causes[0]}; the last good checkpoint is "
                                   f"{last_good or 'none (no step saved yet)'}, kept as it was. Free space or fix "
                                   "the permissions, then resume with --resume_from_checkpoint true")

    def load_checkpoint(self, path: str) -> None:
        """Restore model, optimizer and RNG states from a complete checkpoint."""
        self.strategy.load(os.path.join(path, ckpt.TRAINING_STATE))

    # ----- demo ------------------------------------------------------------------------------------
    def answer(self, prompts: list[str], template, max_new_tokens: int) -> list[str]:
        """Greedy answers of the live model to ``prompts``, up to the template's end-of-turn marker (main process;
        not with sharded parameters), as scripts/chat.py answers."""
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        stops = stop_rule(self.tokenizer, template)
        return [generate_answer(model, self.tokenizer, template, conversation(prompt), max_new_tokens, stops=stops)
                for prompt in prompts]

    @torch.no_grad()
    def answer_samples(self, batches: list[list[int]], stops: StopRule, max_new_tokens: int) -> list[ScoredAnswer]:
        """Greedy answers to validation samples: this rank's ``batches`` of sample indices (sampler.eval_shard),
        each sample's prompt and reference taken from its encoded ids (sft/train/answers.py). All answers, in
        sample order, on the main process; [] on the others.

        Every rank runs the same number of generate calls (a rank with fewer batches repeats one and drops its
        answers), and with several processes generate keeps every rank stepping until all are done
        (synced_gpus): with ZeRO-3 or FSDP2 each forward gathers parameters from every rank."""
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        options = generate_options(self.tokenizer, stops)
        mine: list[ScoredAnswer] = []
        for number in range(self._longest(len(batches))):
            real = number < len(batches)
            indices = batches[number] if real else (batches[0] if batches else [0])
            cases = [answer_case(index, self.val_data[index]["input_ids"], self.val_data[index]["labels"],
                                 self.tokenizer, stops) for index in indices]
            inputs = left_padded([case.prompt_ids for case in cases], self.pad_id)
            out = model.generate(**{key: value.to(self.accelerator.device) for key, value in inputs.items()},
                                 max_new_tokens=max_new_tokens, synced_gpus=self.accelerator.num_processes > 1,
                                 **options)
            if real:
                new_ids = out[:, inputs["input_ids"].shape[1]:].tolist()
                mine += [ScoredAnswer(case.index, self.tokenizer.decode(case.prompt_ids, skip_special_tokens=False),
                                      case.reference, stops.answer_text(self.tokenizer, ids))
                         for case, ids in zip(cases, new_ids)]
        gathered = gather_object(mine) if self.accelerator.num_processes > 1 else mine
        return sorted(gathered, key=lambda answer: answer.index) if self.accelerator.is_main_process else []


def _unknown_as_nan(count: int | None) -> float:
    """A count as summed across processes: NaN for an unknown one, so that the sum is unknown too."""
    return float("nan") if count is None else float(count)


def _count(total: float) -> int | None:
    return None if math.isnan(total) else int(total)


class RouterWindow:
    """One process's router terms of one step (sft/train/moe.py), summed over its micro-batches."""

    def __init__(self):
        self.weighted_sum, self.tokens, self.counts = 0.0, 0, torch.zeros(0, dtype=torch.float64)

    def add(self, terms) -> None:
        if terms is None:
            return
        self.weighted_sum += float(terms.weighted_sum.detach())
        self.tokens += terms.tokens
        self.counts = terms.expert_counts if self.counts.numel() == 0 else self.counts + terms.expert_counts
