"""The GPU suite's driver and report: our trainer (padded, packed with varlen, ZeRO-3)
against TRL's SFTTrainer at its best settings, on Qwen2.5-0.5B and -1.5B shapes, plus the resume check of
bench/gpu_check.sh, in one run that fits a 10-minute device call. Started by bench/gpu_suite.sh (which installs
the carried wheels first); every case is a subprocess with a timeout, so one failure does not sink the rest.

    bash bench/gpu_suite.sh                            # on the GPU machine: the whole plan, report in $OUT
    bash bench/gpu_suite.sh --dry-run                  # CPU: tiny model, 2 steps, the same driver and report
    python bench/gpu_suite.py --list                   # the plan, with each case's time estimate
    python bench/gpu_suite.py --cases varlen,trl       # some cases (variant names, or group/variant)

What each case is (same encoded samples, same optimizer steps, bf16 autocast over fp32 weights, AdamW):

* padded    scripts/train.py, padded batches (as many samples per micro-batch as fit rows x sequence_length if
            all were as long as the longest sample), attn sdpa;
* varlen    scripts/train.py, packed rows, attn "varlen" (sft/train/attention.py: torch's varlen_attn on CUDA);
* zero3     packed rows, strategy deepspeed_train {zero_stage: 3} on the one GPU, attn "auto" (the project's
            default, which picks varlen; the table's attention column says what ran);
* trl       TRL's SFTTrainer on the same encoded rows (input_ids + our labels): packing=True with the "bfd"
            strategy, which turns padding_free on (one flattened row per micro-batch, position_ids restarting per
            sample), its fused LM head (logits at labelled positions only, like ours), gradient checkpointing off,
            liger-kernel's layer kernels when liger_kernel imports (use_liger_kernel; falls back without it, and
            says so, if that fails). Attention: sdpa. flash-attn is not in the image and TRL 1.16's other flash-class
            choice, "kernels-community/...", fetches kernels from the Hub (no network there); with sdpa and no
            attention mask, transformers builds the block-diagonal mask from position_ids (correct; the work a packed
            run of ours with sdpa did before it ran per sample). --trl_attn flex_attention is the other option without flash-attn (its first
            steps compile);
* resume    `ONLY=resume bash bench/gpu_check.sh`: a run stopped by SIGTERM after its step-6 checkpoint and
            resumed vs the same run straight through, twice (its own code, called, not copied).

Numbers per case, over the optimizer steps after the first third (warm-up):

* tokens/s: non-pad tokens per second of wall time per optimizer step (ours: its metrics.jsonl, logging every
  step, time including waiting for batches; TRL: step end to step end, CUDA synchronised, tokens counted in its
  collator);
* MFU: sft.train.modeling.train_flops_per_token (6 x non-embedding parameters + 12 L d x mean sample length + the output
  layer at the supervised fraction of positions) x tokens, for ours and TRL alike (TRL's fused head also computes
  logits at labelled positions only), over the card's dense bf16 peak: the datasheet's (H100 SXM and H200: 989
  TFLOP/s, from torch.cuda.get_device_name) and, beside it, the project's measured peak (sft.train.metrics.
  device_peak_flops: 790 TFLOP/s on this workplace's H100/H200);
* peak memory: torch.cuda.max_memory_allocated inside each process (sft.train.metrics.peak_memory_bytes: ours logs it
  in metrics.jsonl, TRL's worker prints it; max RSS on a CPU), and nvidia-smi's memory.used sampled every 0.5 s
  from outside (allocator cache and CUDA context included), and the process tree's PSS (bench/memory.py).

Goals: packed varlen MFU >= 40% (datasheet peak) on the 1.5B shape; ours (its fastest non-ZeRO case) >= 1.3x
TRL's tokens/s on the same card. Written to $OUT/gpu_suite.md and gpu_suite.json after every case.

A run of ours is stopped (its process group killed) once its last step is in metrics.jsonl: the final checkpoint
scripts/train.py writes (1.5B: ~25 GB of weights and optimizer state) would cost the budget and measures nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ----- model shapes: the real Qwen2.5 configs' values ---------------------------------------------------------
QWEN25_COMMON = dict(vocab_size=151936, rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     hidden_act="silu", use_sliding_window=False, attention_dropout=0.0, tie_word_embeddings=True)
SHAPES = {
    # Qwen2.5-0.5B: 24 layers, hidden 896, 14 query / 2 key-value heads, MLP 4864, vocab 151,936, tied embeddings.
    "0.5b": dict(QWEN25_COMMON, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    # Qwen2.5-1.5B: 28 layers, hidden 1536, 12 query / 2 key-value heads, MLP 8960, vocab 151,936, tied embeddings.
    "1.5b": dict(QWEN25_COMMON, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
    # Qwen3-30B-A3B's layer (hidden 2048, 32 query / 4 key-value heads of 128, experts of 768, 8 routed per token,
    # router loss 0.001) in 8 of its 48 layers with 32 of its 128 experts: ~2.0B parameters, 0.6B active, so
    # fp32 master weights and AdamW state (~32 GB) and 4096-token rows fit one 80 GB card.
    "moe": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                moe_intermediate_size=768, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4,
                head_dim=128, num_experts=32, num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1000000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.001),
    "tiny-moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                     num_experts_per_tok=2, tie_word_embeddings=True, output_router_logits=True,
                     router_aux_loss_coef=0.001),
    # The dry run's: vocab_size is the tokenizer's (a 260-token byte-level one there).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False),
}

# Data under the shared data root (datasets/..., tokenizers/...), with the row keys each needs.
DATASETS = {
    "alpaca": ("datasets/alpaca_en_demo.json", {}),
    "sharegpt": ("datasets/sharegpt_v3_sample_1000.json", {"messages_key": "conversations"}),
}
QWEN_TOKENIZER = "tokenizers/qwen2.5-instruct"

# Dense bf16 datasheet peaks (TFLOP/s) by a substring of torch.cuda.get_device_name; first match wins.
DATASHEET_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                         ("A100", 312.0), ("L40S", 362.0))

GOAL_MFU, GOAL_MFU_SHAPE, GOAL_TRL_RATIO = 0.40, "1.5b", 1.3
RESUME_TOLERANCE = 1e-3  # stopped + resumed: max loss rel diff at most this, or at most the straight rerun's


@dataclass(frozen=True)
class Group:
    """Cases that share a model shape, data, rows per micro-batch and gradient accumulation."""

    name: str
    shape: str
    data: str
    rows: int  # packed rows (of sequence_length) per micro-batch; padded: see padded_batch
    accumulation: int


@dataclass(frozen=True)
class Case:
    name: str  # group/variant, or "resume"
    variant: str  # padded, varlen, zero3, trl, resume
    group: Optional[Group]
    min_s: float  # skipped when less than this is left
    cap_s: float  # its timeout, at most
    gpu_only: bool = False  # skipped in the dry run unless named in --cases


# variant -> (kind, packing, attention, strategy)
VARIANTS = {
    "padded": ("ours", False, "sdpa", None),
    "varlen": ("ours", True, "varlen", None),
    "zero3": ("ours", True, "auto", "zero3"),  # auto: the project's default, varlen (the table shows what ran)
    "trl": ("trl", True, None, None),
    "resume": ("resume", None, None, None),
}
# (variant, shape) -> (min_s, cap_s) on an H100/H200: start-up, import, model build and the steps.
ESTIMATES = {("padded", "1.5b"): (50, 150), ("varlen", "1.5b"): (50, 150),
             ("trl", "1.5b"): (55, 160), ("zero3", "1.5b"): (80, 200),
             ("padded", "0.5b"): (35, 120), ("varlen", "0.5b"): (35, 120),
             ("trl", "0.5b"): (40, 120), ("resume", None): (100, 240),
             ("varlen", "moe"): (60, 180), ("trl", "moe"): (70, 200)}


def plan(dry_run: bool) -> list[Case]:
    """The cases in priority order: what the goals need first, so a short budget drops the least."""
    if dry_run:
        big, small = Group("tiny-sharegpt", "tiny", "sharegpt", 1, 1), Group("tiny-alpaca", "tiny", "alpaca", 1, 1)
        moe = Group("tiny-moe-sharegpt", "tiny-moe", "sharegpt", 1, 1)
        order = [(big, "varlen"), (big, "trl"), (big, "padded"), (big, "zero3"),
                 (small, "varlen"), (small, "trl"), (None, "resume"), (small, "padded"),
                 (moe, "varlen")]
        return [Case(_case_name(g, v), v, g, 3, 180, gpu_only=v in ("zero3", "resume")) for g, v in order]
    # 1.5B: one row of 4096 per micro-batch (two rows and AdamW state would not fit 80 GB without recomputation).
    big, small = Group("1.5b-sharegpt", "1.5b", "sharegpt", 1, 2), Group("0.5b-alpaca", "0.5b", "alpaca", 2, 2)
    moe = Group("moe-sharegpt", "moe", "sharegpt", 1, 2)  # Qwen3-MoE shape, 4096-token packed rows, router loss on
    order = [(big, "varlen"), (big, "trl"), (moe, "varlen"), (moe, "trl"), (big, "padded"), (big, "zero3"),
             (small, "varlen"), (small, "trl"), (None, "resume"), (small, "padded")]
    cases = []
    for g, v in order:
        low, cap = ESTIMATES[(v, g.shape if g else None)]
        cases.append(Case(_case_name(g, v), v, g, low, cap))
    return cases


def _case_name(group: Optional[Group], variant: str) -> str:
    return f"{group.name}/{variant}" if group else variant


def select(cases: list[Case], spec: Optional[str], dry_run: bool) -> tuple[list[Case], list[tuple[Case, str]]]:
    """(cases to run, [(case, why skipped)]) for --cases (comma-separated names or variants; None: all)."""
    if spec:
        wanted = [part.strip() for part in spec.split(",") if part.strip()]
        known = {c.name for c in cases} | {c.variant for c in cases}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise SystemExit(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
        chosen = [c for c in cases if c.name in wanted or c.variant in wanted]
        return chosen, []
    if dry_run:
        skipped = [(c, "skipped on CPU (dry run): name it in --cases to run it") for c in cases if c.gpu_only]
        return [c for c in cases if not c.gpu_only], skipped
    return cases, []


# ----- measurements --------------------------------------------------------------------------------------------
@dataclass
class StepRecord:
    """One optimizer step: non-pad tokens, tokens including padding, samples, supervised tokens, wall seconds."""

    tokens: float
    padded: float
    samples: float
    targets: float
    seconds: float


def warmup_steps(count: int) -> int:
    """Steps left out of the averages: the first third (at least one when there are two or more)."""
    return max(1, count // 3) if count > 1 else 0


@dataclass
class Summary:
    steps: int  # measured (after warm-up)
    tokens_per_second: float
    flops_per_second: Optional[float]  # model FLOPs per second, if a FLOP model was given
    tokens_per_step: float
    samples_per_step: float
    padding: float  # padded positions / all positions


def summarize(records: list[StepRecord], flops_per_token=None) -> Optional[Summary]:
    """Averages over the steps after warm-up; flops_per_token(mean_sample_length, target_fraction) -> FLOPs."""
    kept = records[warmup_steps(len(records)):]
    seconds = sum(r.seconds for r in kept)
    if not kept or seconds <= 0:
        return None
    tokens = sum(r.tokens for r in kept)
    flops = None
    if flops_per_token is not None:
        flops = sum(r.tokens * flops_per_token(r.tokens / max(r.samples, 1e-9), r.targets / max(r.tokens, 1e-9))
                    for r in kept) / seconds
    padded = sum(r.padded for r in kept)
    return Summary(len(kept), tokens / seconds, flops, tokens / len(kept), sum(r.samples for r in kept) / len(kept),
                   1.0 - tokens / padded if padded else 0.0)


def ours_records(metrics_path: str) -> list[StepRecord]:
    """The per-step rows of a scripts/train.py metrics.jsonl logged every step (logging_steps 1)."""
    records = []
    if not os.path.exists(metrics_path):
        return records
    with open(metrics_path, encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line being written
            if "perf/tokens_per_second" not in row:
                continue
            seconds = row["time/step"]
            tokens = row["perf/tokens_per_second"] * seconds
            padding = row.get("perf/padding_ratio", 0.0)
            records.append(StepRecord(tokens, tokens / max(1.0 - padding, 1e-9),
                                      row.get("perf/samples_per_second", 0.0) * seconds,
                                      row.get("perf/supervised_fraction", 1.0) * tokens, seconds))
    return records


def ours_peak_bytes(metrics_path: str) -> Optional[float]:
    peaks = []
    if os.path.exists(metrics_path):
        with open(metrics_path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if "memory/peak_gib" in row:
                    peaks.append(row["memory/peak_gib"] * 2**30)
    return max(peaks) if peaks else None


def last_logged_step(metrics_path: str) -> int:
    records = ours_records(metrics_path)
    return len(records)


def attention_used(log_path: str) -> Optional[str]:
    """The attention backend a scripts/train.py run reports in train.log ("..., attention varlen, ...")."""
    try:
        text = open(log_path, encoding="utf-8").read()
    except OSError:
        return None
    if ", attention " not in text:
        return None
    return text.split(", attention ", 1)[1].split(",", 1)[0]


def parse_trl_output(text: str) -> tuple[list[StepRecord], dict]:
    """The TRL worker's `SUITE_STEP {json}` lines and its last `SUITE_RESULT {json}` line."""
    records, result = [], {}
    for line in text.splitlines():
        if line.startswith("SUITE_RESET"):  # a failed attempt (liger) is measured again without it
            records = []
        elif line.startswith("SUITE_STEP "):
            step = json.loads(line[len("SUITE_STEP "):])
            records.append(StepRecord(step["tokens"], step["padded"], step["samples"], step["targets"], step["seconds"]))
        elif line.startswith("SUITE_RESULT "):
            result = json.loads(line[len("SUITE_RESULT "):])
    return records, result


def parse_resume_output(text: str, returncode: Optional[int]) -> tuple[str, str]:
    """(status, note) from bench/gpu_check.sh's resume lines: PASS when the stopped + resumed run's max loss rel
    diff is at most the straight rerun's or RESUME_TOLERANCE (bf16), FAIL otherwise or when it did not resume."""
    resumed_at, diffs, lines = None, {}, []
    for line in text.splitlines():
        if line.startswith("resumed from checkpoint-"):
            resumed_at = line.rsplit("-", 1)[1].strip()
            lines.append(line.strip())
        elif line.startswith("resume_check"):
            lines.append(line.strip())
            if "FAILED" in line:
                return "FAIL", line.strip()
            for label in ("straight run again", "stopped + resumed"):
                if line.startswith(f"resume_check {label} vs straight: max loss rel diff "):
                    diffs[label] = float(line.split("max loss rel diff ", 1)[1].split()[0])
    note = " / ".join(lines)
    if returncode is None:
        return "timeout", note or "no resume line before the timeout"
    if returncode != 0 or resumed_at is None or "stopped + resumed" not in diffs:
        return "FAIL", note or f"gpu_check.sh exited {returncode} without its resume lines"
    allowed = max(diffs.get("straight run again", 0.0), RESUME_TOLERANCE)
    return ("PASS" if diffs["stopped + resumed"] <= allowed else "FAIL"), note


# ----- device --------------------------------------------------------------------------------------------------
@dataclass
class Device:
    name: str
    cuda: bool
    datasheet_peak: Optional[float]  # FLOP/s
    measured_peak: Optional[float]  # FLOP/s, sft.train.metrics.device_peak_flops


def detect_device(peak_tflops: float = 0.0) -> Device:
    import torch

    from sft.train.metrics import device_peak_flops

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    datasheet = peak_tflops * 1e12 if peak_tflops > 0 else datasheet_peak(name)
    measured = device_peak_flops(argparse.Namespace(peak_tflops=0.0)) if cuda else None
    return Device(name, cuda, datasheet, measured)


def datasheet_peak(name: str) -> Optional[float]:
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def flop_model(model_dir: str):
    """flops_per_token(mean_sample_length, target_fraction) for the model config in model_dir: active parameters
    (an MoE token passes through top-k of its experts) counted on the meta device (no memory, exact, tied
    embeddings once), then sft.train.modeling.train_flops_per_token, as the trainer's MFU counts them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft.train.architectures import Architecture
    from sft.train.modeling import train_flops_per_token
    from sft.train.moe import active_parameters

    config = AutoConfig.from_pretrained(model_dir)
    architecture = Architecture.of(config)
    with torch.device("meta"):
        parameters = active_parameters(AutoModelForCausalLM.from_config(config), architecture.experts,
                                       architecture.experts_per_token)
    return (lambda length, fraction: train_flops_per_token(config, parameters, length, fraction)), parameters


# ----- results and the report ----------------------------------------------------------------------------------
@dataclass
class Result:
    case: str
    variant: str
    shape: Optional[str]
    data: Optional[str]
    status: str  # ok, failed, timeout, skipped, PASS/FAIL (resume)
    note: str = ""
    wall_s: Optional[float] = None
    steps: int = 0
    tokens_per_second: Optional[float] = None
    mfu: Optional[float] = None  # datasheet peak
    mfu_measured_peak: Optional[float] = None  # sft.train.metrics.device_peak_flops
    tokens_per_step: Optional[float] = None
    samples_per_step: Optional[float] = None
    padding: Optional[float] = None
    peak_alloc_gib: Optional[float] = None
    peak_smi_gib: Optional[float] = None
    peak_pss_gib: Optional[float] = None
    attention: Optional[str] = None
    log_tail: str = ""


def fill_measurements(result: Result, records: list[StepRecord], flops_per_token, device: Device) -> None:
    summary = summarize(records, flops_per_token)
    if summary is None:
        return
    result.steps = summary.steps
    result.tokens_per_second = summary.tokens_per_second
    result.tokens_per_step, result.samples_per_step, result.padding = (summary.tokens_per_step,
                                                                       summary.samples_per_step, summary.padding)
    if summary.flops_per_second is not None:
        if device.datasheet_peak:
            result.mfu = summary.flops_per_second / device.datasheet_peak
        if device.measured_peak:
            result.mfu_measured_peak = summary.flops_per_second / device.measured_peak


def _ours_best(results: list[Result], group: str) -> Optional[Result]:
    ours = [r for r in results if r.case.startswith(group + "/") and r.variant in ("padded", "varlen")
            and r.tokens_per_second and r.status == "ok"]
    return max(ours, key=lambda r: r.tokens_per_second) if ours else None


def evaluate_goals(results: list[Result]) -> list[dict]:
    """Each goal with its numbers: PASS, FAIL, or 'not evaluated' (and why)."""
    goals = []
    by_name = {r.case: r for r in results}
    groups = list(dict.fromkeys(r.case.split("/")[0] for r in results if "/" in r.case))
    for group in groups:
        varlen = by_name.get(f"{group}/varlen")
        if varlen is None or varlen.shape != GOAL_MFU_SHAPE:
            continue
        goal = f"packed varlen MFU >= {GOAL_MFU:.0%} on the {GOAL_MFU_SHAPE.upper()} shape ({group})"
        if varlen.status != "ok" or varlen.mfu is None:
            why = varlen.status if varlen.status != "ok" else "no datasheet peak for this device (--peak_tflops)"
            detail = f"varlen case: {why}" + (f": {varlen.note[-160:]}" if varlen.status != "ok" and varlen.note else "")
            goals.append({"goal": goal, "verdict": "not evaluated", "detail": detail})
        else:
            goals.append({"goal": goal, "verdict": "PASS" if varlen.mfu >= GOAL_MFU else "FAIL",
                          "detail": f"MFU {varlen.mfu:.1%} of the datasheet peak"
                                    + (f" ({varlen.mfu_measured_peak:.1%} of the measured peak)"
                                       if varlen.mfu_measured_peak is not None else ""),
                          "value": varlen.mfu})
    for group in groups:
        trl = by_name.get(f"{group}/trl")
        if trl is None:
            continue
        goal = f"ours >= {GOAL_TRL_RATIO}x TRL's tokens/s ({group})"
        best = _ours_best(results, group)
        if trl.status != "ok" or not trl.tokens_per_second:
            goals.append({"goal": goal, "verdict": "not evaluated", "detail": f"TRL case: {trl.status}"})
        elif best is None:
            goals.append({"goal": goal, "verdict": "not evaluated", "detail": "no case of ours finished"})
        else:
            ratio = best.tokens_per_second / trl.tokens_per_second
            goals.append({"goal": goal, "verdict": "PASS" if ratio >= GOAL_TRL_RATIO else "FAIL",
                          "detail": f"ours ({best.variant}) {best.tokens_per_second:,.0f} vs TRL "
                                    f"{trl.tokens_per_second:,.0f} tokens/s = {ratio:.2f}x",
                          "value": ratio})
    return goals


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_report(results: list[Result], header: dict) -> str:
    """The markdown report: header lines, the table of every case (run or not), the goals."""
    lines = [f"# GPU suite: {header.get('device', '?')}", ""]
    for key in ("date", "versions", "budget", "plan", "dry_run_note"):
        if header.get(key):
            lines.append(f"- {key.replace('_', ' ')}: {header[key]}")
    peak = header.get("datasheet_tflops")
    measured = header.get("measured_tflops")
    lines += ["", f"| case | status | tokens/s | MFU ({_fmt(peak, '.0f', '?')} TF) | MFU ({_fmt(measured, '.0f', '?')} TF) "
                  "| peak alloc GiB | nvidia-smi GiB | host PSS GiB | tokens/step | samples/step | padding "
                  "| attention | steps | wall s | note |",
              "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|---|"]
    for r in results:
        note = r.note.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.case} | {r.status} | {_fmt(r.tokens_per_second, ',.0f')} | {_fmt(r.mfu, '.1%')} | "
                     f"{_fmt(r.mfu_measured_peak, '.1%')} | {_fmt(r.peak_alloc_gib, '.1f')} | "
                     f"{_fmt(r.peak_smi_gib, '.1f')} | {_fmt(r.peak_pss_gib, '.1f')} | {_fmt(r.tokens_per_step, ',.0f')} | "
                     f"{_fmt(r.samples_per_step, '.1f')} | {_fmt(r.padding, '.1%')} | {r.attention or '-'} | "
                     f"{r.steps or '-'} | {_fmt(r.wall_s, '.0f')} | {note} |")
    goals = evaluate_goals(results)
    lines += ["", "Goals" + (" (dry run: CPU numbers at tiny size, not the goals' measurement)"
                             if header.get("dry_run_note") else "") + ":"]
    if not goals:
        lines.append("- none evaluated (their cases are not in this run)")
    for goal in goals:
        lines.append(f"- {goal['goal']}: {goal['verdict']} ({goal['detail']})")
    lines += ["", "tokens/s: non-pad tokens per second over the optimizer steps after the first third. MFU: "
                  "sft.train.modeling.train_flops_per_token x tokens (ours and TRL alike) over the dense bf16 peak, "
                  "datasheet and measured. peak alloc: torch.cuda.max_memory_allocated in the process (max RSS on "
                  "a CPU); nvidia-smi: memory.used sampled from outside (cache and context included); host PSS: "
                  "the process tree's (bench/memory.py)."]
    return "\n".join(lines) + "\n"


def write_report(results: list[Result], header: dict, out: Optional[str]) -> str:
    text = format_report(results, header)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_suite.md"), "w", encoding="utf-8") as handle:
            handle.write(text)
        payload = {"header": header, "results": [dataclasses.asdict(r) for r in results],
                   "goals": evaluate_goals(results)}
        with open(os.path.join(out, "gpu_suite.json"), "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1)
    return text


# ----- running a case ------------------------------------------------------------------------------------------
def _memory_module():
    """bench/memory.py (bench/ is no package): its process-tree PSS sampling."""
    import importlib.util

    if "bench_memory" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_memory", os.path.join(ROOT, "bench", "memory.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_memory"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["bench_memory"]


class SmiSampler(threading.Thread):
    """nvidia-smi memory.used (MiB) of GPU 0 every `interval` seconds; peak_gib() is the largest seen."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.peak_mib, self.stopped = interval, None, threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout.strip()
                value = float(out.splitlines()[0])
                self.peak_mib = value if self.peak_mib is None else max(self.peak_mib, value)
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return  # no nvidia-smi: no column
            self.stopped.wait(self.interval)

    def peak_gib(self) -> Optional[float]:
        return None if self.peak_mib is None else self.peak_mib / 1024


@dataclass
class Ran:
    returncode: Optional[int]  # None: killed at the timeout
    seconds: float
    stopped_early: bool  # killed on purpose once its last step was measured
    peak_pss_bytes: int
    peak_smi_gib: Optional[float]
    output: str


def run_process(command: list[str], log_path: str, timeout: float, env: dict, done=None, gpu: bool = False) -> Ran:
    """Run `command` in a session of its own, output to log_path; kill the session at `timeout`, or as soon as
    done() is true (then stopped_early). Samples the tree's PSS, and nvidia-smi when gpu."""
    memory = _memory_module()
    sampler = SmiSampler() if gpu else None
    if sampler:
        sampler.start()
    start, peak, stopped_early = time.perf_counter(), 0, False
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                   start_new_session=True)
        returncode: Optional[int] = None
        while True:
            peak = max(peak, memory.tree_pss_bytes(process.pid))
            try:
                returncode = process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if done is not None and done():
                stopped_early = True
            if stopped_early or time.perf_counter() - start > timeout:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
                returncode = 0 if stopped_early else None
                break
    seconds = time.perf_counter() - start
    if sampler:
        sampler.stopped.set()
        sampler.join(timeout=6)
    output = open(log_path, encoding="utf-8", errors="replace").read()
    return Ran(returncode, seconds, stopped_early, peak, sampler.peak_gib() if sampler else None, output)


def tail(text: str, lines: int = 12) -> str:
    kept = [line for line in text.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line]
    return "\n".join(kept[-lines:])


def error_line(text: str) -> str:
    """The most telling line of a failed run's output: the last error/exception line, else the last line."""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(kept):
        if any(word in line for word in ("Error", "error:", "Exception", "Traceback", "Killed", "OutOfMemory")):
            return line[:300]
    return kept[-1][:300] if kept else "no output"


# ----- setup: tokenizer, model configs, encoded data -----------------------------------------------------------
def data_root() -> str:
    """Where datasets/ and tokenizers/ are: $SFT_SHARED_DATA, ./shared/data (a checkout's own), ./.gpu_data (what
    `bash bench/gpu_suite.sh --prepare` copies and the device call carries), ../shared/data (this workplace)."""
    candidates = [os.environ.get("SFT_SHARED_DATA"), os.path.join(ROOT, "shared", "data"),
                  os.path.join(ROOT, ".gpu_data"), os.path.join(os.path.dirname(ROOT), "shared", "data")]
    for folder in candidates:
        if folder and os.path.isdir(os.path.join(folder, "datasets")):
            return folder
    raise FileNotFoundError("no data: none of $SFT_SHARED_DATA, shared/data, .gpu_data, ../shared/data holds datasets/; "
                     "run `bash bench/gpu_suite.sh --prepare` where ../shared/data exists and carry .gpu_data")


def write_models(work: str, shapes: set[str], tokenizer: str, root: str) -> dict[str, str]:
    """A folder per shape with the tokenizer and its config (Qwen2, or the shape's model_type; random init from it:
    from_scratch)."""
    from transformers import AutoConfig, AutoTokenizer

    source = os.path.join(work, "tokenizer")
    if tokenizer == "byte":
        from sft.data.local_tokenizer import CHATML_JINJA, save_byte_tokenizer

        save_byte_tokenizer(source, chat_template=CHATML_JINJA)
    else:
        AutoTokenizer.from_pretrained(os.path.join(root, QWEN_TOKENIZER)).save_pretrained(source)
    loaded = AutoTokenizer.from_pretrained(source)
    folders = {}
    for shape in sorted(shapes):
        folder = os.path.join(work, f"model-{shape}")
        loaded.save_pretrained(folder)
        values = dict(SHAPES[shape])
        values.setdefault("vocab_size", len(loaded))
        family = values.pop("model_type", "qwen2")
        AutoConfig.for_model(family, use_cache=False, eos_token_id=loaded.eos_token_id, pad_token_id=loaded.pad_token_id,
                             bos_token_id=None, **{"max_position_embeddings": 32768, **values}).save_pretrained(folder)
        folders[shape] = folder
    return folders


def ours_config(path: str, *, work: str, name: str, model: str, data_file: str, data_keys: dict, template: str,
                sequence_length: int, steps: int, batch: int, accumulation: int, packing: bool, attn: str,
                dtype: str, strategy: Optional[str], encoded: Optional[str]) -> None:
    """A scripts/train.py run config (YAML): logging every step, no saving before the end, no tracker."""
    keys = "".join(f"{key}: {value}\n" for key, value in data_keys.items())
    strategy_text = ("  strategy_args: {strategy_name: deepspeed_train, strategy_config: {zero_stage: 3}}\n"
                     if strategy == "zero3" else "")
    encoded_text = f", encoded_path: {encoded}" if encoded else ""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"""exp_name: gpu-suite-{name.replace('/', '-')}
seed: 0
output_dir: {work}
logging_dir: {work}/logs
save_steps: 100000
logging_steps: 1
eval_steps: 100000
sequence_length: {sequence_length}
pretrain: {model}
track_with: none
{keys}sft_train:
  use_sequence_packing: {str(packing).lower()}
  model_args: {{dtype: {dtype}, from_scratch: true, attn_implementation: {attn}}}
  training_args: {{max_steps: {steps}, learning_rate: 1.0e-4, per_device_train_batch_size: {batch}, gradient_accumulation_steps: {accumulation}, warmup_steps: 2}}
  data_args: {{file_name: {data_file}, template: {template}, on_bad_sample: skip{encoded_text}}}
{strategy_text}""")


# ----- the TRL worker (a subprocess of the driver) -------------------------------------------------------------
def trl_worker(argv: list[str]) -> None:
    """TRL's SFTTrainer on our encoded rows; prints SUITE_STEP per optimizer step and SUITE_RESULT at the end."""
    parser = argparse.ArgumentParser(prog="gpu_suite.py trl-case")
    parser.add_argument("--model", required=True)
    parser.add_argument("--encoded", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--max_length", type=int, required=True)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--liger", choices=("auto", "off"), default="auto")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import importlib.util

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sft.data.pipeline import load_encoded
    from sft.train.metrics import peak_memory_bytes

    cuda = torch.cuda.is_available()
    data = load_encoded(os.path.join(args.encoded, "train")).select_columns(["input_ids", "labels"])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    counted: list[dict] = []  # per micro-batch, in collation order (the trainer takes them in that order)

    class Counting:
        """The trainer's collator, counting each micro-batch on the CPU before it moves (no device sync)."""

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, examples):
            batch = self.inner(examples)
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            positions = batch.get("position_ids")
            counted.append({"tokens": int(mask.sum()) if mask is not None else ids.numel(), "padded": ids.numel(),
                            "samples": int((positions == 0).sum()) if positions is not None else ids.shape[0],
                            "targets": int((batch["labels"][:, 1:] != -100).sum())})
            return batch

    class Timer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.last = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            taken = [counted.pop(0) for _ in range(min(args.accumulation, len(counted)))]
            step = {key: sum(item[key] for item in taken) for key in ("tokens", "padded", "samples", "targets")}
            step["seconds"] = now - self.last
            self.last = now
            print("SUITE_STEP " + json.dumps(step), flush=True)

    def build(liger: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), attn_implementation=args.attn,
                                                 dtype=torch.float32)
        model.config.use_cache = False
        config = SFTConfig(
            output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.rows,
            gradient_accumulation_steps=args.accumulation, learning_rate=1e-4, warmup_steps=2,
            lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0, bf16=cuda, fp16=False, use_cpu=not cuda,
            gradient_checkpointing=False, packing=True, packing_strategy="bfd", padding_free=True,
            max_length=args.max_length, dataloader_num_workers=0, seed=0, data_seed=0, save_strategy="no",
            eval_strategy="no", report_to="none", logging_steps=max(args.steps, 1), disable_tqdm=True,
            use_liger_kernel=liger)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[Timer()])
        trainer.data_collator = Counting(trainer.data_collator)
        return trainer, model

    liger_state = "off"
    if args.liger == "auto":
        liger_state = "on" if cuda and importlib.util.find_spec("liger_kernel") else (
            "off (liger_kernel not installed)" if cuda else "off (CPU)")
    trainer = model = None
    if liger_state == "on":
        try:
            trainer, model = build(True)
            trainer.train()
        except Exception as error:  # noqa: BLE001 - any liger failure: measure TRL without it, and say so
            liger_state = f"off (liger failed: {type(error).__name__}: {str(error)[:160]})"
            print(f"SUITE_RESET {liger_state}", flush=True)
            counted.clear()
            trainer = model = None
    if trainer is None:  # the failed attempt's memory is released before the next model is built
        import gc

        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        trainer, model = build(False)
        trainer.train()
    rows = len(trainer.train_dataset)
    print("SUITE_RESULT " + json.dumps({
        "peak_alloc_bytes": peak_memory_bytes(), "liger": liger_state,
        "attention": model.config._attn_implementation, "packed_rows": rows,
        "padding_free": bool(getattr(trainer, "padding_free", False))}), flush=True)


# ----- the driver ----------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", "--cpu-smoke", dest="dry_run", action="store_true",
                        help="tiny model, byte-level tokenizer, fp32, sequence_length 512, 2 steps (CPU)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated case names (group/variant) or variants (varlen, trl, ...); default all")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per case (default 24; dry run 2)")
    parser.add_argument("--sequence_length", type=int, default=None, help="default 4096; dry run 512")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="seconds from --started_at for the whole suite (default 540: a 600 s call; dry run 600)")
    parser.add_argument("--started_at", type=float, default=None, help="epoch seconds the suite began (gpu_suite.sh)")
    parser.add_argument("--reserve_s", type=float, default=10.0, help="seconds kept back per case for its kill")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="datasheet peak override (TFLOP/s)")
    parser.add_argument("--trl_attn", default="sdpa", help="TRL's attn_implementation (sdpa; flex_attention)")
    parser.add_argument("--no_liger", action="store_true", help="TRL without liger-kernel even where it imports")
    parser.add_argument("--resume_batch", type=int, default=2, help="BATCH for gpu_check.sh's resume check")
    parser.add_argument("--tokenizer", choices=("qwen", "byte"), default=None, help="default qwen; dry run byte")
    parser.add_argument("--out", default=os.environ.get("OUT") or None, help="report folder (default $OUT)")
    parser.add_argument("--work", default=None, help="scratch folder (default a new one under /tmp)")
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.dry_run else 24)
    args.sequence_length = args.sequence_length if args.sequence_length is not None else (512 if args.dry_run else 4096)
    args.budget_s = args.budget_s if args.budget_s is not None else (600.0 if args.dry_run else 540.0)
    args.started_at = args.started_at or time.time()
    args.tokenizer = args.tokenizer or ("byte" if args.dry_run else "qwen")
    if args.steps < 1 or args.sequence_length < 64:
        parser.error("--steps must be >= 1 and --sequence_length >= 64")
    return args


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in ("torch", "transformers", "accelerate", "datasets", "deepspeed", "trl", "peft", "liger-kernel"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} missing")
    return ", ".join(parts)


class Suite:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.deadline = args.started_at + args.budget_s
        self.results: list[Result] = []
        self.header: dict = {}
        self.encoded: dict[str, str] = {}
        self.encode_failed: dict[str, str] = {}
        self.max_length: dict[str, int] = {}
        self.models: dict[str, str] = {}
        self.flops: dict[str, object] = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        # scripts and gpu_check.sh call python3: the interpreter running this driver
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")

    def left(self) -> float:
        return self.deadline - time.time()

    def report(self) -> str:
        """The table so far, in plan order (cases skipped up front sit where they belong), written to --out."""
        order = {case.name: index for index, case in enumerate(plan(self.args.dry_run))}
        self.results.sort(key=lambda r: order.get(r.case, len(order)))
        return write_report(self.results, self.header, self.args.out)

    def run(self, cases: list[Case], skipped: list[tuple[Case, str]]) -> int:
        args = self.args
        self.device = detect_device(args.peak_tflops)
        if args.dry_run and self.device.cuda:
            print("note: --dry-run on a machine with CUDA still runs on it (tiny model)")
        self.work = args.work or tempfile.mkdtemp(prefix="gpu_suite_")
        os.makedirs(os.path.join(self.work, "logs"), exist_ok=True)
        self.header = {
            "device": self.device.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "versions": versions(),
            "datasheet_tflops": self.device.datasheet_peak / 1e12 if self.device.datasheet_peak else None,
            "measured_tflops": self.device.measured_peak / 1e12 if self.device.measured_peak else None,
            "budget": f"{args.budget_s:.0f} s from the suite's start ({time.time() - args.started_at:.0f} s spent "
                      f"before the driver: wheel install, imports); {args.steps} steps a case, sequence_length "
                      f"{args.sequence_length}",
            "plan": ", ".join(c.name for c in cases),
            "dry_run_note": "CPU dry run: tiny Qwen2 shape, byte-level tokenizer, fp32" if args.dry_run else "",
        }
        print(f"gpu_suite: {self.device.name} | {self.header['versions']}")
        print(f"time budget: {args.budget_s:.0f} s from start, {self.left():.0f} s left now; work folder {self.work}")
        print(f"{'case':<22} {'min s':>6} {'cap s':>6}")
        for case in cases:
            print(f"{case.name:<22} {case.min_s:>6.0f} {case.cap_s:>6.0f}")
        total = sum(c.min_s for c in cases)
        if total > self.left():
            print(f"the plan needs ~{total:.0f} s at least and {self.left():.0f} s are left: the last cases may be "
                  "skipped (rerun them with --cases)")
        for case, why in skipped:
            self.results.append(self._blank(case, "skipped", why))
        self.report()
        runnable = [c for c in cases if self.left() - args.reserve_s >= c.min_s]
        try:
            self._setup(runnable)  # only for cases that can still run: a spent budget builds nothing
        except Exception as error:  # noqa: BLE001 - the table still prints what ran (nothing) and why
            import traceback

            traceback.print_exc()
            for case in cases:
                self.results.append(self._blank(case, "failed", f"setup: {type(error).__name__}: {error}"))
            print(self.report())
            return 1
        for case in cases:
            result = self._run_case(case)
            self.results.append(result)
            speed = f"{result.tokens_per_second:,.0f} tokens/s" if result.tokens_per_second else ""
            print(f"[{time.time() - args.started_at:5.0f} s] {case.name}: {result.status} {speed} {result.note}".rstrip(),
                  flush=True)
            self.report()
        text = self.report()
        print("\n" + text)
        short = [r.case for r in self.results if r.status == "skipped" and r.note.startswith("out of time")]
        if short:
            print(f"skipped for time; another call can run them: bash bench/gpu_suite.sh --cases {','.join(short)}")
        return 0

    def _blank(self, case: Case, status: str, note: str) -> Result:
        g = case.group
        return Result(case.name, case.variant, g.shape if g else None, g.data if g else None, status, note)

    def _setup(self, cases: list[Case]) -> None:
        """Model configs for the shapes and one encoding per data set the chosen cases use (shared by all cases)."""
        needed = [c for c in cases if c.group is not None]
        if not needed:
            return
        root = data_root()
        print(f"data: {root}")
        shapes = {c.group.shape for c in needed}
        self.models = write_models(self.work, shapes, self.args.tokenizer, root)
        for shape, folder in self.models.items():
            self.flops[shape] = flop_model(folder)
            print(f"model {shape}: {self.flops[shape][1] / 1e6:,.1f}M parameters ({folder})")
        for data in dict.fromkeys(c.group.data for c in needed):
            self._encode(data, root, self.models[sorted(self.models)[0]])

    def _template(self) -> str:
        return "chatml" if self.args.tokenizer == "byte" else "qwen2_5"

    def _data_file(self, data: str, root: str) -> str:
        return os.path.join(root, DATASETS[data][0])

    def _encode(self, data: str, root: str, model: str) -> None:
        args = self.args
        folder = os.path.join(self.work, f"encoded-{data}")
        config = os.path.join(self.work, f"encode-{data}.yaml")
        self.data_files = getattr(self, "data_files", {})
        self.data_files[data] = self._data_file(data, root)
        ours_config(config, work=os.path.join(self.work, f"encode-{data}"), name=f"encode-{data}", model=model,
                    data_file=self.data_files[data], data_keys=DATASETS[data][1], template=self._template(),
                    sequence_length=args.sequence_length, steps=1, batch=1, accumulation=1, packing=False,
                    attn="sdpa", dtype="fp32", strategy=None, encoded=None)
        timeout = min(180.0, self.left() - self.args.reserve_s)
        if timeout < 5:
            self.encode_failed[data] = f"out of time before encoding {data}"
            return
        ran = run_process([sys.executable, os.path.join(ROOT, "scripts", "encode.py"), "--config_path", config,
                           "--out", folder], os.path.join(self.work, "logs", f"encode-{data}.log"), timeout, self.env)
        meta = os.path.join(folder, "encode_meta.json")
        if ran.returncode != 0 or not os.path.exists(meta):
            self.encode_failed[data] = f"encoding {data} failed: {error_line(ran.output)}"
            print(self.encode_failed[data])
            return
        report = json.load(open(meta, encoding="utf-8"))["reports"]["train"]
        self.encoded[data] = folder
        self.max_length[data] = int(report["length_percentiles"]["max"])
        print(f"encoded {data} in {ran.seconds:.0f} s: {report['samples']:,} samples, {report['total_tokens']:,} tokens, "
              f"longest {self.max_length[data]:,}")

    def _run_case(self, case: Case) -> Result:
        left = self.left() - self.args.reserve_s
        if left < case.min_s:
            return self._blank(case, "skipped", f"out of time: {max(left, 0):.0f} s left, needs ~{case.min_s:.0f} s")
        timeout = min(case.cap_s, left)
        kind = VARIANTS[case.variant][0]
        if kind != "resume" and case.group.data in self.encode_failed:
            return self._blank(case, "failed", self.encode_failed[case.group.data])
        try:
            if kind == "ours":
                return self._ours(case, timeout)
            if kind == "trl":
                return self._trl(case, timeout)
            return self._resume(case, timeout)
        except Exception as error:  # noqa: BLE001 - one case's driver-side failure does not sink the rest
            import traceback

            traceback.print_exc()
            return self._blank(case, "failed", f"driver: {type(error).__name__}: {error}")

    def _ours(self, case: Case, timeout: float) -> Result:
        args, group = self.args, case.group
        _, packing, attn, strategy = VARIANTS[case.variant]
        work = os.path.join(self.work, case.name.replace("/", "-"))
        batch = group.rows if packing else max(1, group.rows * args.sequence_length // self.max_length[group.data])
        config = os.path.join(self.work, case.name.replace("/", "-") + ".yaml")
        ours_config(config, work=work, name=case.name, model=self.models[group.shape],
                    data_file=self.data_files[group.data], data_keys=DATASETS[group.data][1], template=self._template(),
                    sequence_length=args.sequence_length, steps=args.steps, batch=batch,
                    accumulation=group.accumulation, packing=packing, attn=attn,
                    dtype="bf16" if self.device.cuda else "fp32", strategy=strategy, encoded=self.encoded[group.data])
        metrics = os.path.join(work, "logs", "metrics.jsonl")
        if case.variant == "zero3" and not self._importable("deepspeed"):
            return self._blank(case, "failed", "deepspeed is not installed (carry its wheel: bench/gpu_suite.sh --prepare)")
        ran = run_process([sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config_path", config],
                          os.path.join(self.work, "logs", case.name.replace("/", "-") + ".log"), timeout, self.env,
                          done=lambda: last_logged_step(metrics) >= args.steps, gpu=self.device.cuda)
        result = self._blank(case, "ok", "")
        result.wall_s, result.peak_pss_gib, result.peak_smi_gib = ran.seconds, ran.peak_pss_bytes / 2**30, ran.peak_smi_gib
        result.attention = attention_used(os.path.join(work, "logs", "train.log"))
        peak = ours_peak_bytes(metrics)
        result.peak_alloc_gib = peak / 2**30 if peak is not None else None
        records = ours_records(metrics)
        fill_measurements(result, records, self.flops[group.shape][0], self.device)
        notes = [f"micro-batch {batch} {'rows' if packing else 'samples'} x {group.accumulation}"]
        if ran.stopped_early:
            notes.append("stopped after its last step (final checkpoint skipped)")
        if ran.returncode is None:
            result.status = "timeout"
            notes.append(f"killed after {timeout:.0f} s with {len(records)}/{args.steps} steps")
        elif ran.returncode != 0 or len(records) < args.steps:
            result.status = "failed"
            notes.append(error_line(ran.output))
        elif attn != "auto" and result.attention and result.attention != attn:
            result.status = "failed"
            notes.append(f"ran with attention {result.attention}, not {attn}")
        result.note = "; ".join(notes)
        if result.status != "ok":
            result.log_tail = tail(ran.output)
        return result

    def _trl(self, case: Case, timeout: float) -> Result:
        args, group = self.args, case.group
        if not self._importable("trl"):
            return self._blank(case, "skipped", "trl is not installed (carry its wheel: bench/gpu_suite.sh --prepare)")
        command = [sys.executable, os.path.abspath(__file__), "trl-case", "--model", self.models[group.shape],
                   "--encoded", self.encoded[group.data], "--rows", str(group.rows),
                   "--accumulation", str(group.accumulation), "--steps", str(args.steps),
                   "--max_length", str(args.sequence_length), "--attn", args.trl_attn,
                   "--liger", "off" if args.no_liger else "auto",
                   "--out", os.path.join(self.work, case.name.replace("/", "-"))]
        ran = run_process(command, os.path.join(self.work, "logs", case.name.replace("/", "-") + ".log"), timeout,
                          self.env, gpu=self.device.cuda)
        records, info = parse_trl_output(ran.output)
        result = self._blank(case, "ok", "")
        result.wall_s, result.peak_pss_gib, result.peak_smi_gib = ran.seconds, ran.peak_pss_bytes / 2**30, ran.peak_smi_gib
        result.attention = info.get("attention") or args.trl_attn
        if info.get("peak_alloc_bytes") is not None:
            result.peak_alloc_gib = info["peak_alloc_bytes"] / 2**30
        fill_measurements(result, records, self.flops[group.shape][0], self.device)
        notes = [f"bfd packing, padding_free, {group.rows} row(s) x {group.accumulation}, liger {info.get('liger', '?')}"]
        if ran.returncode is None:
            result.status = "timeout"
            notes.append(f"killed after {timeout:.0f} s with {len(records)}/{args.steps} steps")
        elif ran.returncode != 0 or not info or len(records) < args.steps:
            result.status = "failed"
            notes.append(error_line(ran.output))
        result.note = "; ".join(notes)
        if result.status != "ok":
            result.log_tail = tail(ran.output)
        return result

    def _resume(self, case: Case, timeout: float) -> Result:
        env = dict(self.env, ONLY="resume", WORK=os.path.join(self.work, "resume"), BATCH=str(self.args.resume_batch))
        ran = run_process(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")],
                          os.path.join(self.work, "logs", "resume.log"), timeout, env, gpu=self.device.cuda)
        status, note = parse_resume_output(ran.output, ran.returncode)
        result = self._blank(case, status, note)
        result.wall_s, result.peak_pss_gib, result.peak_smi_gib = ran.seconds, ran.peak_pss_bytes / 2**30, ran.peak_smi_gib
        if status != "PASS":
            result.log_tail = tail(ran.output)
            if not note:
                result.note = error_line(ran.output)
        return result

    @staticmethod
    def _importable(module: str) -> bool:
        import importlib.util

        return importlib.util.find_spec(module) is not None


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["trl-case"]:
        trl_worker(argv[1:])
        return 0
    args = parse_args(argv)
    cases, skipped = select(plan(args.dry_run), args.cases, args.dry_run)
    if args.list:
        for case in cases:
            print(f"{case.name:<22} min {case.min_s:>4.0f} s  cap {case.cap_s:>4.0f} s")
        for case, why in skipped:
            print(f"{case.name:<22} {why}")
        return 0
    return Suite(args).run(cases, skipped)


if __name__ == "__main__":
    sys.exit(main())
