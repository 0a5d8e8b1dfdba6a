"""Supervised fine-tuning, the pipeline: data, model, loop with validation, checkpoints and resume, metrics.

    accelerate launch scripts/train.py --config_path configs/demo.yaml
    accelerate launch --num_processes 8 scripts/train.py --config_path configs/qwen2.5-7B-sft_zero3.yaml \\
        --output_dir out --resume_from_checkpoint true --sft_train.training_args.max_steps 1200

The run config decides the strategy (ddp_train, deepspeed_train); the launcher decides how many
processes. Raw files are encoded once on the main process (cached under output_dir); a folder from
scripts/encode.py can be given as sft_train.data_args.encoded_path. SIGTERM/SIGINT finish the step,
save a checkpoint and exit 0, so a preempted job resumes with --resume_from_checkpoint true.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from sft import checkpoint as ckpt  # noqa: E402
from sft.cli import run_script  # noqa: E402
from sft.config import SFTConfig  # noqa: E402
from sft.dataset import build_encoded, load_tokenizer  # noqa: E402
from sft.sampler import epoch_order, eval_shard, step_micro_batches, steps_per_epoch  # noqa: E402
from sft.templates import get_template  # noqa: E402
from sft.modeling import train_flops_per_token  # noqa: E402
from sft.worker import SFTWorker, build_accelerator, device_peak_flops, peak_memory_bytes  # noqa: E402


class RunLog:
    """Metrics to TensorBoard (through Accelerate), <logs>/metrics.jsonl and <logs>/train.log (main only)."""

    def __init__(self, config: SFTConfig, accelerator):
        self.accelerator, self.main = accelerator, accelerator.is_main_process
        if self.main:
            os.makedirs(config.logs_dir(), exist_ok=True)
            self.metrics = open(os.path.join(config.logs_dir(), "metrics.jsonl"), "a", encoding="utf-8")
            self.text = open(os.path.join(config.logs_dir(), "train.log"), "a", encoding="utf-8")
        if config.track_with != "none":
            accelerator.init_trackers(config.exp_name, config=_flat(config))

    def line(self, message: str) -> None:
        if self.main:
            tqdm.write(message)
            self.text.write(message + "\n")
            self.text.flush()

    def scalars(self, step: int, values: dict) -> None:
        values = {key: value for key, value in values.items() if isinstance(value, (int, float)) and math.isfinite(value)}
        self.accelerator.log(values, step=step)
        if self.main:
            self.metrics.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
            self.metrics.flush()


def _flat(config: SFTConfig) -> dict:
    import dataclasses

    flat = {}

    def walk(prefix, value):
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}{f.name}.", getattr(value, f.name))
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix.rstrip(".")] = value
        else:
            flat[prefix.rstrip(".")] = str(value)

    walk("", config)
    return flat


def load_data(config: SFTConfig, accelerator, tokenizer):
    """The encoded train/validation datasets: from encoded_path, or encoded here once (main process first)."""
    from datasets import load_from_disk

    folder = config.sft_train.data_args.encoded_path
    if folder is None:
        with accelerator.main_process_first():
            folder, meta, reused = build_encoded(config, tokenizer=tokenizer,
                                                 log=print if accelerator.is_main_process else (lambda *_: None))
        if accelerator.is_main_process and not reused:
            from sft.dataset import format_report

            for split, report in meta["reports"].items():
                print(format_report(split, report))
    train = load_from_disk(os.path.join(folder, "train"))
    val_path = os.path.join(folder, "validation")
    validation = load_from_disk(val_path) if os.path.isdir(val_path) else None
    if config.sft_train.use_sequence_packing and "position_ids" not in train.column_names:
        from sft.packing import build_packed, format_packing_report

        # Deterministic, so every process packs the same rows; validation stays unpacked (each sample once).
        train, report = build_packed(train, config.sequence_length, config.sft_train.data_args.packing_strategy)
        if accelerator.is_main_process:
            print(format_packing_report(report))
    return train, validation


def packing_fill_ratio(train, sequence_length: int):
    """Real tokens / (rows x sequence_length) of a packed training set; None when samples are not packed."""
    if "position_ids" not in train.column_names:
        return None
    return sum(train["length"]) / (len(train) * sequence_length)


def main(config: SFTConfig) -> dict:
    accelerator = build_accelerator(config)
    from accelerate.utils import set_seed

    set_seed(config.seed)
    log = RunLog(config, accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    args = config.sft_train.training_args

    # ----- data ------------------------------------------------------------------------------------
    tokenizer = load_tokenizer(config.pretrain)
    train, validation = load_data(config, accelerator, tokenizer)
    per_epoch = steps_per_epoch(len(train), world, args.per_device_train_batch_size, args.gradient_accumulation_steps)
    global_batch = world * args.per_device_train_batch_size * args.gradient_accumulation_steps
    if per_epoch == 0:
        raise SystemExit(f"error: {len(train)} training samples are fewer than one global batch of {global_batch} "
                         f"({world} processes x per_device_train_batch_size x gradient_accumulation_steps)")
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    if len(train) % global_batch:
        log.line(f"note: {len(train) % global_batch} samples per epoch beyond whole global batches of {global_batch} "
                 "wait for a later epoch's order (each epoch is reshuffled)")

    # ----- model -----------------------------------------------------------------------------------
    worker = SFTWorker(config, accelerator, tokenizer, train, validation)
    info = worker.initialize(total_steps)
    resume = ckpt.resolve_resume(config.resume_from_checkpoint, config.output_dir)
    if resume:
        state = worker.load_checkpoint(resume)
        log.line(f"resumed from {resume} at step {worker.step}")
    log.line(f"model {info['parameters'] / 1e6:.2f}M parameters, attention {info['attention']}, "
             f"strategy {config.sft_train.strategy_args.strategy_name}, {world} process(es) | "
             f"{len(train):,} samples, {per_epoch} steps/epoch, {total_steps} steps, global batch {global_batch}")
    fill = packing_fill_ratio(train, config.sequence_length)
    if fill is not None:
        log.scalars(worker.step, {"data/packing_fill_ratio": fill})
        log.line(f"packed rows: {len(train):,}, fill ratio {fill:.1%}")
    template = get_template(config.template_name(), tokenizer)
    prompts = config.validation.sample_prompts
    can_generate = prompts and not worker.params_sharded
    before = worker.answer(prompts, template, config.validation.max_new_tokens) if can_generate and accelerator.is_main_process else []

    # ----- preemption ------------------------------------------------------------------------------
    stop = {"signal": None}

    def request_stop(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    # ----- loop ------------------------------------------------------------------------------------
    peak_flops = device_peak_flops(config)
    window = {"loss_x_targets": 0.0, "targets": 0.0, "tokens": 0.0, "padded": 0.0, "samples": 0.0, "seconds": 0.0,
              "data": 0.0, "forward_backward": 0.0, "optimizer": 0.0, "steps": 0}
    eval_seconds = checkpoint_seconds = 0.0
    last_saved = worker.step if resume else -1
    val_metrics, metrics = {}, {}
    first_loss = None
    if worker.step >= total_steps:
        log.line(f"nothing to train: the checkpoint is at step {worker.step} of {total_steps}; raise "
                 "sft_train.training_args.max_steps (or num_train_epochs) to train further")
    progress = tqdm(total=total_steps, initial=worker.step, desc="train", disable=not accelerator.is_main_process,
                    dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)
    run_start = time.perf_counter()
    while worker.step < total_steps:
        epoch, in_epoch = divmod(worker.step, per_epoch)
        order = epoch_order(len(train), config.seed, epoch)
        started = time.perf_counter()
        metrics = worker.train_step(step_micro_batches(order, in_epoch, rank, world, args.per_device_train_batch_size,
                                                       args.gradient_accumulation_steps))
        elapsed = time.perf_counter() - started
        step = worker.step
        first_loss = metrics["loss"] if first_loss is None else first_loss
        window["loss_x_targets"] += metrics["loss"] * metrics["target_tokens"]
        for key, source in (("targets", "target_tokens"), ("tokens", "tokens"), ("padded", "padded_tokens"),
                            ("samples", "samples"), ("data", "data"), ("forward_backward", "forward_backward"),
                            ("optimizer", "optimizer")):
            window[key] += metrics[source]
        window["seconds"] += elapsed
        window["steps"] += 1
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens'] / elapsed:,.0f}")

        if step % config.logging_steps == 0 or step == total_steps:
            tokens_per_second = window["tokens"] / window["seconds"]
            scalars = {
                "train/loss": window["loss_x_targets"] / max(window["targets"], 1.0),
                "train/grad_norm": metrics["grad_norm"], "train/lr": metrics["lr"], "train/epoch": step / per_epoch,
                "perf/tokens_per_second": tokens_per_second,
                "perf/samples_per_second": window["samples"] / window["seconds"],
                "perf/padding_ratio": 1.0 - window["tokens"] / max(window["padded"], 1.0),
                "perf/supervised_fraction": window["targets"] / max(window["tokens"], 1.0),
                "time/data": window["data"], "time/forward_backward": window["forward_backward"],
                "time/optimizer": window["optimizer"], "time/step": window["seconds"] / window["steps"],
                "memory/peak_gib": peak_memory_bytes() / 2**30,
            }
            if peak_flops:
                flops_per_token = train_flops_per_token(worker.model_config, worker.parameter_count,
                                                        window["tokens"] / max(window["samples"], 1.0),
                                                        window["targets"] / max(window["tokens"], 1.0))
                scalars["perf/mfu"] = flops_per_token * tokens_per_second / (peak_flops * world)
            log.scalars(step, scalars)
            mfu = f" | mfu {scalars['perf/mfu']:.1%}" if "perf/mfu" in scalars else ""
            log.line(f"step {step:05d} ({step / total_steps:.1%}) | loss {scalars['train/loss']:.4f} | "
                     f"grad {metrics['grad_norm']:.3f} | lr {metrics['lr']:.2e} | dt {1000 * scalars['time/step']:.0f}ms | "
                     f"tok/s {tokens_per_second:,.0f}{mfu} | pad {scalars['perf/padding_ratio']:.1%} | "
                     f"mem {scalars['memory/peak_gib']:.2f}GiB" + (" | skipped (NaN)" if metrics["skipped"] else ""))
            window = dict.fromkeys(window, 0.0)
            window["steps"] = 0

        if validation is not None and (step % config.eval_steps == 0 or step == total_steps):
            val_metrics = worker.val_step(eval_shard(len(validation), rank, world, config.sft_train.infer_batch_size))
            eval_seconds += val_metrics["eval_seconds"]
            log.scalars(step, {"val/loss": val_metrics["val_loss"], "time/eval": val_metrics["eval_seconds"]})
            log.line(f"step {step:05d} | val loss {val_metrics['val_loss']:.4f} over {val_metrics['val_tokens']:,.0f} tokens")

        stopping = worker._all_sum([1.0 if stop["signal"] else 0.0])[0] > 0
        if step % config.save_steps == 0 or step == total_steps or stopping:
            state = {"step": step, "epoch": epoch, "step_in_epoch": in_epoch + 1, "total_steps": total_steps,
                     "loss": metrics["loss"], "val_loss": val_metrics.get("val_loss"), "seed": config.seed}
            saved = worker.do_checkpoint(state)
            last_saved = step
            checkpoint_seconds += saved["checkpoint_seconds"]
            log.scalars(step, {"time/checkpoint": saved["checkpoint_seconds"]})
            log.line(f"step {step:05d} | saved {saved['checkpoint']} in {saved['checkpoint_seconds']:.1f}s")
        if stopping:
            log.line(f"received {stop['signal'] or 'a stop request'} on some process: saved at step {step}; resume with "
                     "--resume_from_checkpoint true")
            break
    progress.close()

    # ----- summary ---------------------------------------------------------------------------------
    summary = {"steps": worker.step, "first_loss": first_loss, "last_loss": metrics.get("loss"),
               "val_loss": val_metrics.get("val_loss"), "seconds": time.perf_counter() - run_start,
               "eval_seconds": eval_seconds, "checkpoint_seconds": checkpoint_seconds, "last_checkpoint": last_saved,
               "peak_memory_gib": peak_memory_bytes() / 2**30}
    if can_generate and accelerator.is_main_process and not stop["signal"]:
        after = worker.answer(prompts, template, config.validation.max_new_tokens)
        for prompt, old, new in zip(prompts, before, after):
            log.line(f"prompt: {prompt!r}\n  before: {old!r}\n  after:  {new!r}")
    log.line("summary: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}))
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    run_script(main)
