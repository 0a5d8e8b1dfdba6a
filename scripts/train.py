"""Supervised fine-tuning, the pipeline: data, model, loop with validation, checkpoints and resume, metrics.

    accelerate launch scripts/train.py --config_path configs/demo.yaml
    accelerate launch --num_processes 8 scripts/train.py --config_path configs/qwen2.5-7B-sft_zero3.yaml \\
        --output_dir out --resume_from_checkpoint true --sft_train.training_args.max_steps 1200

The run config decides the strategy; the launcher decides how many processes. Raw files are encoded once on
the main process (cached under output_dir), or sft_train.data_args.encoded_path names a folder from encode.py
or pack.py. A resume is checked against the checkpoint's run state. SIGTERM/SIGINT finish the step, save a
checkpoint and exit 0. A step: StepBatch (sft/train/loader.py) -> SFTWorker.train_step (sft/train/worker.py, through the
strategy) -> StepResult -> RunState counters and MetricsWindow (sft/train/metrics.py) -> log, validation, checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager


from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from sft.train import checkpoint as ckpt
from sft.cli import run_script
from sft.config import SFTConfig
from sft.errors import UserError
from sft.data.build import (build_encoded, check_encoded_folder, format_report, load_tokenizer, template_identity,
                            tokenizer_fingerprint)
from sft.train.loader import StepDataset, step_loader
from sft.train.lora import describe as describe_adapter
from sft.train.metrics import MFU, MetricsWindow, RunLog, RunTotals, device_peak_flops, step_line
from sft.runlock import RunLock, check_writable
from sft.staging import remove_stale_staging
from sft.train.runstate import DataIdentity, RunState, check_resume, packing_of
from sft.train.sampler import Layout, eval_shard
from sft.train.schedule import Schedule
from sft.train.strategies import build_accelerator, finish, leave_after_finish, make_strategy
from sft.data.pipeline import load_encoded
from sft.data.templates import get_template
from sft.generation import stop_rule
from sft.train.worker import SFTWorker

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # finish the step, save, exit 0


def load_data(config: SFTConfig, accelerator, tokenizer):
    """The encoded train/validation datasets (from encoded_path, or encoded here once, main process first)
    and the identity of the training rows."""
    data_args = config.sft_train.data_args
    folder = data_args.encoded_path
    if folder is None:
        with accelerator.main_process_first():
            folder, meta, reused = build_encoded(config, tokenizer=tokenizer,
                                                 log=print if accelerator.is_main_process else (lambda *_: None))
        if accelerator.is_main_process and not reused:
            for split, report in meta["reports"].items():
                print(format_report(split, report))
    else:  # checked against this run: tokenizer, template, sequence_length, field mapping, label settings
        meta = check_encoded_folder(config, folder, tokenizer)
    train = load_encoded(os.path.join(folder, "train"))
    val_path = os.path.join(folder, "validation")
    validation = load_encoded(val_path) if os.path.isdir(val_path) else None
    if config.sft_train.use_sequence_packing and "position_ids" not in train.column_names:
        from sft.data.packing import build_packed, format_packing_report

        # Deterministic, so every process packs the same rows; validation stays unpacked (each sample once).
        train, report = build_packed(train, config.sequence_length, data_args.packing_strategy)
        if accelerator.is_main_process:
            print(format_packing_report(report))
    return train, validation, DataIdentity.of(meta, tokenizer_fingerprint(tokenizer), template_identity(config),
                                              config.sequence_length, packing_of(folder, config))


def on_main_process(accelerator, work):
    """``work()`` on the main process only, its result handed to every process. A UserError it raises ends the
    run on every process: the main one raises it (one `error:` line), the others exit 1 without a word."""
    result, problem = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except UserError as error:
            problem = error
    if accelerator.num_processes > 1:
        result, failed = broadcast_object_list([result, problem is not None])
        if failed:  # every process is here: take the process group down together, then stop
            finish(accelerator)
            if not accelerator.is_main_process:
                sys.exit(1)
    if problem is not None:
        raise problem
    return result


@contextmanager
def output_dir_held(config: SFTConfig, accelerator):
    """The run's lock on output_dir (sft/runlock.py), taken by the main process once the run's folders proved
    writable; a second run in the same folder is refused. Yields the notes on what dead runs left and was removed."""
    lock = RunLock(config.output_dir)

    def take() -> list[str]:
        check_writable([config.output_dir, ckpt.checkpoints_root(config.output_dir), config.logs_dir()])
        lock.acquire()
        stale = ckpt.remove_staging(config.output_dir) + remove_stale_staging(os.path.join(config.output_dir, "encoded"))
        return [f"removed {name}, an unfinished write of a run that ended" for name in stale]

    notes = on_main_process(accelerator, take)
    try:
        yield notes
    finally:
        lock.release()


def main(config: SFTConfig) -> dict:
    strategy = make_strategy(config)
    accelerator = build_accelerator(config, strategy)
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        with output_dir_held(config, accelerator) as notes:
            return fine_tune(config, strategy, accelerator, notes)
    finally:  # a caller that runs training in its own process (tests, notebooks) gets its handlers back
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def fine_tune(config: SFTConfig, strategy, accelerator, notes: list[str]) -> dict:
    set_seed(config.seed)
    args = config.sft_train.training_args
    rank, layout = accelerator.process_index, Layout(accelerator.num_processes, args.per_device_train_batch_size,
                                                     args.gradient_accumulation_steps)

    # ----- data, run state, resume check -----------------------------------------------------------
    tokenizer = load_tokenizer(config.pretrain)
    train, validation, identity = load_data(config, accelerator, tokenizer)
    per_epoch = layout.steps_per_epoch(len(train))
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    adapter = describe_adapter(config.sft_train.model_args)
    run = RunState.start(layout, strategy.name, identity, Schedule.from_config(args, total_steps), adapter)
    resume, skipped = on_main_process(accelerator, lambda: ckpt.resolve_resume(config.resume_from_checkpoint,
                                                                                config.output_dir))
    notes = notes + skipped
    if resume:  # checked before anything is loaded; refused with a message naming what differs and the fix
        saved = RunState.from_json(ckpt.read_state(resume))
        notes += check_resume(saved, run, strategy.reshards_on_load, config.resume_accept_changes, resume, config.cluster_name)
        run = run.continued_from(saved)
    log = RunLog(config, accelerator, resumed_at=run.step if resume else None)
    if len(train) % layout.global_batch:
        notes.append(f"{len(train) % layout.global_batch} samples per epoch beyond whole global batches of "
                     f"{layout.global_batch} wait for a later epoch's order (each epoch is reshuffled)")

    # ----- model -----------------------------------------------------------------------------------
    worker = SFTWorker(config, accelerator, strategy, tokenizer, train, validation)
    info = worker.initialize()
    if resume:
        worker.load_checkpoint(resume)
        log.line(f"resumed from {resume} at step {run.step} ({run.samples:,} samples, {run.tokens:,} tokens seen)")
    for note in notes:
        log.line(f"note: {note}")
    trains = f"{adapter}: {info.trainable / 1e6:.2f}M trainable" if adapter else "all trainable"
    router = "" if info.router_aux_loss_coef is None else f", router loss x {info.router_aux_loss_coef:g}"
    mixers = f", {info.per_sample_mixers} recurrent/conv layers per sample" if info.per_sample_mixers else ""
    log.line(f"model {info.architecture}{router}{mixers}")
    if info.adapters:
        log.line(f"LoRA adapters on: {info.adapters}")
    log.line(f"model {info.parameters / 1e6:.2f}M parameters ({trains}), attention {info.attention}, strategy {strategy.name}, "
             f"{layout.processes} process(es) | {len(train):,} samples, {per_epoch} steps/epoch, {total_steps} steps, "
             f"global batch {layout.global_batch}")
    if "position_ids" in train.column_names:
        fill = sum(train["length"]) / (len(train) * config.sequence_length)
        log.scalars(run.step, {"data/packing_fill_ratio": fill})
        log.line(f"packed rows: {len(train):,}, fill ratio {fill:.1%}")
    template = get_template(config.template_name(), tokenizer, config.sft_train.data_args.chat_template_kwargs)
    prompts = config.validation.sample_prompts
    can_generate = bool(prompts) and not strategy.params_sharded and accelerator.is_main_process
    before = worker.answer(prompts, template, config.validation.max_new_tokens) if can_generate else []
    scored = min(config.validation.generate_samples, len(validation)) if validation is not None else 0
    stops = stop_rule(tokenizer, template)

    # ----- preemption: finish the step, save, exit 0 -------------------------------------------------
    stop: dict = {}
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda number, _frame: stop.setdefault("signal", signal.Signals(number).name))

    # ----- loop ------------------------------------------------------------------------------------
    peak_flops = device_peak_flops(config)
    mfu = MFU(worker.model_config, worker.active_parameter_count, peak_flops, layout.processes) if peak_flops else None
    window, totals = MetricsWindow(), RunTotals(last_checkpoint=run.step if resume else -1)
    if run.step >= total_steps:
        log.line(f"nothing to train: the checkpoint is at step {run.step} of {total_steps}; raise "
                 "sft_train.training_args.max_steps (or num_train_epochs) to train further")
    patience = args.early_stopping_patience
    if patience and run.evaluations_since_best >= patience:
        log.line(f"nothing to train: the run stopped early at step {run.step} ({run.evaluations_since_best} evaluations "
                 f"without a lower val/loss than {run.best_val_loss:.4f} at step {run.best_step}); raise "
                 "sft_train.training_args.early_stopping_patience to train further")
        total_steps = run.step
    dataset = StepDataset(train, layout, rank, config.seed, per_epoch, worker.pad_id,
                          config.sft_train.data_args.pad_to_multiple_of)
    batches = iter(step_loader(dataset, run.step, total_steps, args.dataloader_num_workers))
    progress = tqdm(total=total_steps, initial=run.step, desc="train", disable=not accelerator.is_main_process,
                    dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)
    while run.step < total_steps:
        started = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - started
        result = worker.train_step(batch, run.schedule.lr(run.step))
        run.advance(result.samples, result.tokens, per_epoch)
        window.add(result, time.perf_counter() - started, waited)
        totals.trained(result)
        step = run.step
        progress.update(1)
        progress.set_postfix(loss=f"{result.loss:.4f}")

        if step % config.logging_steps == 0 or step == total_steps:
            values = window.scalars(result, run.epoch, run.tokens, run.samples, mfu)
            log.scalars(step, values)
            log.line(step_line(step, total_steps, values, result.skipped))
            window = MetricsWindow()

        new_best = stop_early = False
        if validation is not None and (step % config.eval_steps == 0 or step == total_steps):
            val = worker.val_step(eval_shard(len(validation), rank, layout.processes, config.sft_train.infer_batch_size))
            totals.validated(val)
            new_best = run.validated(val.loss)  # the same on every process: val.loss is summed over all
            stop_early = 0 < patience <= run.evaluations_since_best
            log.scalars(step, val.scalars())
            log.line(f"step {step:05d} | val loss {val.loss:.4f} over {val.tokens:,} tokens"
                     + (" | best so far" if new_best else f" | best {run.best_val_loss:.4f} at step {run.best_step}"))
            if scored:
                answers = worker.answer_samples(eval_shard(scored, rank, layout.processes, config.sft_train.infer_batch_size),
                                                stops, config.validation.max_new_tokens)
                log.answers(step, answers)

        stopping = worker.any_process("signal" in stop)
        if (step % config.save_steps == 0 or step == total_steps or stopping or stop_early
                or (new_best and args.keep_best)):
            folder, seconds = worker.do_checkpoint(run)
            totals.saved(step, seconds)
            log.scalars(step, {"time/checkpoint": seconds})
            log.line(f"step {step:05d} | saved {folder} in {seconds:.1f}s")
        if stopping:
            log.line(f"received {stop.get('signal', 'a stop request')} on some process: saved at step {step}; resume with "
                     "--resume_from_checkpoint true")
            break
        if stop_early:
            log.line(f"early stop: {patience} evaluations without a lower val/loss than {run.best_val_loss:.4f} at step "
                     f"{run.best_step}; saved at step {step}. The best checkpoint: {config.output_dir}/best")
            break
    progress.close()

    # ----- summary ---------------------------------------------------------------------------------
    if can_generate and not stop:
        after = worker.answer(prompts, template, config.validation.max_new_tokens)
        for prompt, old, new in zip(prompts, before, after):
            log.line(f"prompt: {prompt!r}\n  before: {old!r}\n  after:  {new!r}")
    summary = totals.summary(run.step, run.tokens, run.samples)
    log.line("summary: " + json.dumps(summary))
    finish(accelerator)
    return summary


if __name__ == "__main__":
    try:
        run_script(main)
    except SystemExit as stop:
        leave_after_finish(stop.code)  # returns when no process group is up
        raise
    leave_after_finish()
