"""What a step reports, how logged steps are summed, and where the numbers go.

``StepResult`` is one optimizer step summed over all processes (the worker returns it); ``MetricsWindow``
sums the steps between two log lines and turns them into the logged scalars, token-weighted (the loss of a
window is its summed token loss over its target tokens, not a mean of step means); ``RunLog`` writes them
to the trackers (TensorBoard, Weights & Biases, MLflow, trackio through Accelerate), ``<logs>/metrics.jsonl``
and ``<logs>/train.log``.

A resumed run continues its own logs: metrics.jsonl keeps the entries up to the checkpoint's step and drops
those the interrupted run wrote after it (they are trained again), and TensorBoard purges them from its view.
A run that does not resume starts both files anew, so two runs never mix in one file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import time
from dataclasses import dataclass
from typing import Optional

from tqdm.auto import tqdm


@dataclass
class StepResult:
    """One optimizer step, summed over all processes."""

    loss_sum: float
    """Summed cross-entropy of the step's target tokens."""
    target_tokens: int
    tokens: int
    """Non-pad tokens."""
    padded_tokens: int
    """Tokens including padding (batch shape)."""
    samples: int
    grad_norm: float
    lr: float
    skipped: bool
    """on_nan: skip dropped this step."""
    data_seconds: float
    """Moving the step's batches to the device and counting them across processes."""
    forward_backward_seconds: float
    optimizer_seconds: float
    aux_sum: float = 0.0
    """MoE: sum over samples of tokens x router balance loss (sft/train/moe.py); train/aux_loss = aux_sum / router_tokens."""
    router_tokens: int = 0
    expert_counts: Optional[object] = None
    """MoE: (layers, experts) tensor of top-k choices over the step's tokens; None without a router."""
    correct_tokens: Optional[int] = None
    """Target tokens that are the argmax of their logits (train/token_accuracy); None when a forward did not count
    them (Liger's fused loss)."""

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.target_tokens, 1)


@dataclass
class ValResult:
    loss: float
    tokens: int
    """Target tokens."""
    seconds: float
    correct_tokens: Optional[int] = None
    """Target tokens that are the argmax of their logits; None when not counted (Liger)."""

    def scalars(self) -> dict[str, float]:
        """The logged scalars of this evaluation."""
        values = {"val/loss": self.loss, "time/eval": self.seconds}
        if self.correct_tokens is not None:
            values["val/token_accuracy"] = self.correct_tokens / max(self.tokens, 1)
        return values


def add_counts(first: Optional[int], second: Optional[int]) -> Optional[int]:
    """A sum of two counts either of which may be unknown (None): unknown when one is."""
    return None if first is None or second is None else first + second


@dataclass
class MFU:
    """Model FLOPs utilisation: the model's FLOPs per trained token against the devices' peak."""

    model_config: object
    parameters: int
    peak_flops_per_device: float
    devices: int

    def of(self, tokens_per_second: float, mean_sample_length: float, target_fraction: float) -> float:
        from sft.train.modeling import train_flops_per_token

        flops = train_flops_per_token(self.model_config, self.parameters, mean_sample_length, target_fraction)
        return flops * tokens_per_second / (self.peak_flops_per_device * self.devices)


@dataclass
class MetricsWindow:
    """Sums of the steps since the last log line."""

    loss_sum: float = 0.0
    target_tokens: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    samples: int = 0
    steps: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0
    forward_backward_seconds: float = 0.0
    optimizer_seconds: float = 0.0
    aux_sum: float = 0.0
    router_tokens: int = 0
    expert_counts: Optional[object] = None
    correct_tokens: Optional[int] = 0

    def add(self, result: StepResult, seconds: float, wait_seconds: float) -> None:
        """Add a step that took ``seconds`` of wall time, ``wait_seconds`` of it waiting for its batches."""
        for name in ("loss_sum", "target_tokens", "tokens", "padded_tokens", "samples", "forward_backward_seconds",
                     "optimizer_seconds", "aux_sum", "router_tokens"):
            setattr(self, name, getattr(self, name) + getattr(result, name))
        self.correct_tokens = add_counts(self.correct_tokens, result.correct_tokens)
        if result.expert_counts is not None and result.expert_counts.numel():
            self.expert_counts = (result.expert_counts if self.expert_counts is None
                                  else self.expert_counts + result.expert_counts)
        self.data_seconds += wait_seconds + result.data_seconds
        self.seconds += seconds
        self.steps += 1

    def scalars(self, last: StepResult, epoch: float, tokens_seen: int, samples_seen: int,
                mfu: Optional[MFU]) -> dict[str, float]:
        """The logged scalars of this window (``last``: its final step, for gradient norm and learning rate)."""
        tokens_per_second = self.tokens / self.seconds
        values = {
            "train/loss": self.loss_sum / max(self.target_tokens, 1), "train/grad_norm": last.grad_norm,
            "train/lr": last.lr, "train/epoch": epoch, "train/tokens_seen": tokens_seen,
            "train/samples_seen": samples_seen,
            "perf/tokens_per_second": tokens_per_second, "perf/samples_per_second": self.samples / self.seconds,
            "perf/padding_ratio": 1.0 - self.tokens / max(self.padded_tokens, 1),
            "perf/supervised_fraction": self.target_tokens / max(self.tokens, 1),
            "time/data": self.data_seconds, "time/forward_backward": self.forward_backward_seconds,
            "time/optimizer": self.optimizer_seconds, "time/step": self.seconds / self.steps,
            "memory/peak_gib": peak_memory_bytes() / 2**30,
        }
        if self.correct_tokens is not None:
            values["train/token_accuracy"] = self.correct_tokens / max(self.target_tokens, 1)
        if self.router_tokens:
            values["train/aux_loss"] = self.aux_sum / self.router_tokens
        if self.expert_counts is not None:
            from sft.train.moe import expert_load

            values.update(expert_load(self.expert_counts))
        if mfu is not None:
            values["perf/mfu"] = mfu.of(tokens_per_second, self.tokens / max(self.samples, 1),
                                        self.target_tokens / max(self.tokens, 1))
        return values


@dataclass
class RunTotals:
    """What the end-of-run summary reports besides the run state's counters."""

    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    val_loss: Optional[float] = None
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    last_checkpoint: int = -1
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def trained(self, result: StepResult) -> None:
        self.first_loss = result.loss if self.first_loss is None else self.first_loss
        self.last_loss = result.loss

    def validated(self, result: ValResult) -> None:
        self.val_loss, self.eval_seconds = result.loss, self.eval_seconds + result.seconds

    def saved(self, step: int, seconds: float) -> None:
        self.last_checkpoint, self.checkpoint_seconds = step, self.checkpoint_seconds + seconds

    def summary(self, steps: int, tokens_seen: int, samples_seen: int) -> dict:
        values = {"steps": steps, "tokens_seen": tokens_seen, "samples_seen": samples_seen,
                  **dataclasses.asdict(self), "seconds": time.perf_counter() - self.started,
                  "peak_memory_gib": peak_memory_bytes() / 2**30}
        del values["started"]
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in values.items()}


def step_line(step: int, total_steps: int, values: dict[str, float], skipped: bool) -> str:
    """The one console line of a logged step."""
    mfu = f" | mfu {values['perf/mfu']:.1%}" if "perf/mfu" in values else ""
    aux = f" | acc {values['train/token_accuracy']:.1%}" if "train/token_accuracy" in values else ""
    aux += f" | aux {values['train/aux_loss']:.4f}" if "train/aux_loss" in values else ""
    if "moe/expert_load_max" in values:
        aux += f" | load max {values['moe/expert_load_max']:.2f}"
    return (f"step {step:05d} ({step / total_steps:.1%}) | loss {values['train/loss']:.4f}{aux} | "
            f"grad {values['train/grad_norm']:.3f} | lr {values['train/lr']:.2e} | dt {1000 * values['time/step']:.0f}ms | "
            f"tok/s {values['perf/tokens_per_second']:,.0f}{mfu} | pad {values['perf/padding_ratio']:.1%} | "
            f"mem {values['memory/peak_gib']:.2f}GiB" + (" | skipped (NaN)" if skipped else ""))


class RunLog:
    """Metrics to TensorBoard (through Accelerate), <logs>/metrics.jsonl and <logs>/train.log (main process only)."""

    def __init__(self, config, accelerator, resumed_at: Optional[int]):
        """``resumed_at``: the checkpoint's step when the run resumes (its logs continue), None for a new run."""
        self.accelerator, self.main = accelerator, accelerator.is_main_process
        if self.main:
            folder = config.logs_dir()
            os.makedirs(folder, exist_ok=True)
            metrics = os.path.join(folder, "metrics.jsonl")
            kept = _entries_up_to(metrics, resumed_at) if resumed_at is not None else []
            self.metrics = open(metrics, "w", encoding="utf-8")
            self.metrics.writelines(kept)
            self.metrics.flush()
            self.text = open(os.path.join(folder, "train.log"), "a" if resumed_at is not None else "w", encoding="utf-8")
        if config.trackers():
            start = 0 if resumed_at is None else resumed_at + 1
            options = tracker_options(config, start)
            uri = options.get("mlflow", {}).pop("tracking_uri", None)
            if uri is not None and self.main:
                import mlflow

                if uri.startswith("file:"):  # MLflow 3 refuses its file store unless asked for it
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri(uri)
            accelerator.init_trackers(config.exp_name, config=_flat(config), init_kwargs=options)

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

    def answers(self, step: int, answers: list) -> None:
        """Scored validation answers (sft.train.answers.ScoredAnswer, on the main process): val/exact_match as a
        scalar, the answers as a record in metrics.jsonl and as a table in each tracker that has one."""
        if not self.main or not answers:
            return
        from sft.train.answers import ANSWER_COLUMNS, exact_match_rate

        rate = exact_match_rate(answers)
        self.scalars(step, {"val/exact_match": rate})
        self.metrics.write(json.dumps({"step": step, "time": time.time(),
                                       "val/answers": [answer.record() for answer in answers]}) + "\n")
        self.metrics.flush()
        missed = [f"{a.answer!r} for {a.reference!r}" for a in answers if not a.match]
        self.line(f"step {step:05d} | exact match {len(answers) - len(missed)}/{len(answers)} ({rate:.1%})"
                  + (f" | missed: {', '.join(missed[:3])}" + (", ..." if len(missed) > 3 else "") if missed else ""))
        rows = [[step, a.prompt, a.reference, a.answer, a.match] for a in answers]
        for tracker in self.accelerator.trackers:
            TABLE_WRITERS[tracker.name](tracker, "val/answers", list(ANSWER_COLUMNS), rows, step)


def _wandb_table(tracker, name: str, columns: list[str], rows: list[list], step: int) -> None:
    tracker.log_table(name, columns=columns, data=rows, step=step)


def _trackio_table(tracker, name: str, columns: list[str], rows: list[list], step: int) -> None:
    import trackio

    tracker.log({name: trackio.Table(columns=columns, data=rows)}, step=step)


def _mlflow_table(tracker, name: str, columns: list[str], rows: list[list], step: int) -> None:
    import mlflow  # Accelerate's MLflow tracker keeps its run active: the table goes to it, as a JSON artifact

    mlflow.log_table({column: [row[i] for row in rows] for i, column in enumerate(columns)},
                     artifact_file=f"{name}/step_{step:06d}.json")


def _tensorboard_text(tracker, name: str, columns: list[str], rows: list[list], step: int) -> None:
    """TensorBoard has no tables: a Markdown table in its Text tab."""
    cells = [[str(cell).replace("|", "\\|").replace("\n", "\\n") for cell in row] for row in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + ["| " + " | ".join(row) + " |" for row in cells]
    tracker.writer.add_text(name, "\n".join(lines), global_step=step)


# How each tracker (Accelerate's tracker name) takes a table of rows.
TABLE_WRITERS = {"wandb": _wandb_table, "trackio": _trackio_table, "mlflow": _mlflow_table,
                 "tensorboard": _tensorboard_text}


def tensorboard_dir(config) -> str:
    return config.tracker_kwargs.get("log_dir", os.path.join(config.logs_dir(), "tensorboard"))


def tracker_options(config, start: int) -> dict:
    """Each tracker's init options: the config's tracker_kwargs, plus what the run decides. TensorBoard's
    purge_step hides what earlier event files logged from ``start`` on (an interrupted run's steps after its
    checkpoint, or an earlier run's in the same folder); mlflow's store is $MLFLOW_TRACKING_URI, else a file
    store under the logs, MLflow's local store that needs no server or database (its tracking_uri is set by
    RunLog, not passed on)."""
    options = {name: dict(config.tracker_kwargs.get(name, {})) for name in config.trackers()}
    if "tensorboard" in options:
        options["tensorboard"].setdefault("purge_step", start)
    if "mlflow" in options and "MLFLOW_TRACKING_URI" not in os.environ:
        options["mlflow"].setdefault("tracking_uri", "file:" + os.path.abspath(os.path.join(config.logs_dir(), "mlruns")))
    return options


def require_trackers(config) -> None:
    """Refuse, at start and naming the install, a tracker whose package is missing."""
    import importlib.util

    from sft.config.run import TRACKERS
    from sft.errors import ConfigError

    for name in config.trackers():
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"track_with: {name} is not installed; pip install {TRACKERS[name]} (all trackers: "
                              "pip install -r requirements-trackers.txt), or leave it out of track_with")


def _entries_up_to(path: str, step: int) -> list[str]:
    """The lines of a metrics.jsonl logged at or before ``step`` (a torn last line is dropped too)."""
    if not os.path.exists(path):
        return []
    kept = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    return kept


def _flat(config) -> dict:
    """The config as flat dotted keys with scalar values, for the tracker's hyperparameters."""
    flat = {}

    def walk(prefix, value):
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}{f.name}.", getattr(value, f.name))
        else:
            flat[prefix.rstrip(".")] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config)
    return flat


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA allocator peak on a GPU, max RSS on CPU."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak_flops(config) -> Optional[float]:
    """Peak FLOP/s of one device for MFU: peak_tflops when set, else a known GPU's bf16 dense peak."""
    import torch

    if config.peak_tflops > 0:
        return config.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if "H100" in name or "H200" in name:
            return 790e12  # measured bf16 dense matmul peak on this workplace's H100/H200
    return None
