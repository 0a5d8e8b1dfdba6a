"""scripts/train.py end to end on CPU: resume, loss normalisation, strategies, checkpoints, preemption, metrics.

Every run is a real process (real `accelerate launch` for two ranks) on a tiny Qwen2-shaped model.
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT


ROWS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."}
        for a in range(8) for b in range(6)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from sft.data.local_tokenizer import CHATML_JINJA, save_byte_tokenizer

    root = tmp_path_factory.mktemp("train")
    model = str(root / "model")
    save_byte_tokenizer(model, chat_template=CHATML_JINJA)
    tokenizer = AutoTokenizer.from_pretrained(model)
    model_config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               tie_word_embeddings=False, use_cache=False, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    # Saved weights, as in fine-tuning: every strategy starts from the same ones (ZeRO-3 initialises a model
    # built from a config alone inside zero.Init, with other random values).
    torch.manual_seed(7)
    Qwen2ForCausalLM(model_config).save_pretrained(model)
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:40]) + "\n")
    (root / "val.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[40:]) + "\n")
    config = root / "run.yaml"
    config.write_text(f"""
seed: 7
sequence_length: 96
pretrain: {model}
logging_steps: 1
eval_steps: 4
save_steps: 4
track_with: tensorboard
validation:
  data_args:
    file_name: {root / 'val.jsonl'}
sft_train:
  model_args: {{dtype: fp32, attn_implementation: sdpa}}
  training_args: {{max_steps: 8, learning_rate: 1.0e-3, per_device_train_batch_size: 4, warmup_steps: 2}}
  data_args: {{file_name: {root / 'train.jsonl'}, template: chatml}}
  infer_batch_size: 3
""")
    return root, str(config)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(config, out, *overrides, processes=1):
    args = ["--config_path", config, "--output_dir", str(out), "--logging_dir", str(out / "logs"),
            "--tracker_kwargs", f"{{log_dir: {out / 'tb'}}}", *overrides]
    if processes == 1:
        return [sys.executable, os.path.join(ROOT, "scripts", "train.py"), *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), os.path.join(ROOT, "scripts", "train.py"), *args]


def environment(tmp_root):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(str(tmp_root), "torch_ext")))
    return env


def train(setup, out, *overrides, processes=1, check=True):
    root, config = setup
    result = subprocess.run(command(config, out, *overrides, processes=processes), capture_output=True, text=True,
                            cwd=ROOT, env=environment(root), timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(result.stdout[-5000:] + result.stderr[-5000:])
    return result


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a node failure would (ranks may sit in sessions of
    their own, out of reach of a process-group kill)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    doomed, stack = [], [pid]
    while stack:
        current = stack.pop()
        doomed.append(current)
        stack.extend(children.get(current, []))
    for victim in doomed:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_after_checkpoint(setup, out, step, last, *overrides, processes=1):
    """Start a run and SIGKILL it, launcher and every rank at once as a node failure would, once checkpoint
    ``step`` is complete (and before ``last``, the final step)."""
    root, config = setup
    # A session of its own, so the kill takes the launcher and every rank at once.
    process = subprocess.Popen(command(config, out, *overrides, processes=processes), cwd=ROOT, env=environment(root),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = out / "sft_train" / f"checkpoint-{step}" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    kill_tree(process.pid)
    process.wait()
    time.sleep(0.5)
    assert marker.exists() and not (out / "sft_train" / f"checkpoint-{last}").exists(), "the run ended before the kill"


def weights(out, step):
    from safetensors.torch import load_file

    return load_file(os.path.join(str(out), "sft_train", f"checkpoint-{step}", "sft_train", "model.safetensors"))


def logged(out, tag):
    """(step, value) of every metrics.jsonl entry with ``tag``, in file order."""
    rows = [json.loads(line) for line in open(os.path.join(str(out), "logs", "metrics.jsonl"))]
    return [(row["step"], row[tag]) for row in rows if tag in row]


def losses(out):
    return dict(logged(out, "train/loss"))


def assert_close_weights(reference, candidate, label):
    assert reference.keys() == candidate.keys()
    for name in reference:
        assert torch.allclose(reference[name], candidate[name], rtol=1e-5, atol=1e-6), (label, name)


RESUME_CASES = {
    "ddp-1-process": ([], 1),
    "packed-1-process": (["--sft_train.use_sequence_packing", "true"], 1),
    "zero3-2-processes": (["--sft_train.strategy_args.strategy_name", "deepspeed_train",
                           "--sft_train.strategy_args.strategy_config", "{zero_stage: 3}"], 2),
    "fsdp2-2-processes": (["--sft_train.strategy_args.strategy_name", "fsdp2_train"], 2),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_after_sigkill_is_bitwise_exact(setup, tmp_path, case):
    root, config = setup
    strategy, processes = RESUME_CASES[case]
    steps = [*strategy, "--sft_train.training_args.max_steps", "40", "--save_steps", "4", "--eval_steps", "100"]
    train(setup, tmp_path / "straight", *steps, processes=processes)
    killed = tmp_path / "killed"
    kill_after_checkpoint(setup, killed, 4, 40, *steps, processes=processes)
    if case == "ddp-1-process":  # the weights are stored once, in the HF export, and resumed from there
        kept = os.listdir(killed / "sft_train" / "checkpoint-4" / "training_state")
        assert "optimizer.bin" in kept and not [name for name in kept if name.startswith("model")], kept
    resumed = train(setup, killed, *steps, "--resume_from_checkpoint", "true", processes=processes)
    assert "resumed from" in resumed.stdout + resumed.stderr
    straight, again = weights(tmp_path / "straight", 40), weights(killed, 40)
    assert straight.keys() == again.keys()
    for name in straight:
        assert torch.equal(straight[name], again[name]), name
    # The resumed run's log continues the killed one's: each step once (what the killed run logged after its
    # checkpoint is dropped), and the counters go on from the checkpoint.
    assert [step for step, _ in logged(killed, "train/loss")] == list(range(1, 41))
    assert logged(killed, "train/tokens_seen") == logged(tmp_path / "straight", "train/tokens_seen")


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_and_resume_works(setup, tmp_path):
    """Exact resume: killed while checkpoint N is being written, the run resumes from N-1 and ends as if never killed."""
    root, config = setup
    steps = ["--sft_train.training_args.max_steps", "24", "--save_steps", "1", "--eval_steps", "100"]
    train(setup, tmp_path / "straight", *steps[:2], "--save_steps", "24", "--eval_steps", "100")
    for attempt in range(5):
        out = tmp_path / f"killed-{attempt}"
        process = subprocess.Popen(command(config, out, *steps), cwd=ROOT, env=environment(root),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        root_dir = out / "sft_train"
        caught = None
        deadline = time.time() + 300
        while caught is None and process.poll() is None and time.time() < deadline:
            staging = [p for p in (root_dir.glob(".tmp-checkpoint-*") if root_dir.exists() else [])
                       if int(p.name.rsplit("-", 1)[1]) >= 3]
            if staging:
                kill_tree(process.pid)
                caught = staging[0]
        process.wait()
        if caught is not None and caught.exists():
            break
    else:
        pytest.fail("never caught the run in the middle of a save")
    step = int(caught.name.rsplit("-", 1)[1])
    from sft.train import checkpoint as ckpt

    assert ckpt.latest_checkpoint(str(out)) == ckpt.checkpoint_dir(str(out), step - 1)
    resumed = train(setup, out, *steps, "--resume_from_checkpoint", "true")
    assert f"checkpoint-{step - 1} at step {step - 1}" in resumed.stdout + resumed.stderr
    assert not caught.exists()  # the half-written folder was cleaned up
    straight, again = weights(tmp_path / "straight", 24), weights(out, 24)
    for name in straight:
        assert torch.equal(straight[name], again[name]), name


def test_accumulation_and_ranks_give_the_same_update(setup, tmp_path):
    # adam_epsilon 1: updates smooth in the gradient, so float32 summation order cannot flip a sign-like step.
    common = ["--sft_train.training_args.max_steps", "2", "--save_steps", "2", "--eval_steps", "100",
              "--sft_train.training_args.adam_epsilon", "1.0", "--sft_train.training_args.learning_rate", "0.5"]
    train(setup, tmp_path / "bs8", *common, "--sft_train.training_args.per_device_train_batch_size", "8")
    train(setup, tmp_path / "ga8", *common, "--sft_train.training_args.per_device_train_batch_size", "1",
          "--sft_train.training_args.gradient_accumulation_steps", "8")
    train(setup, tmp_path / "ranks", *common, "--sft_train.training_args.per_device_train_batch_size", "4",
          "--save_steps", "1", processes=2)
    # The 2 x 4 run's step-1 checkpoint resumed as 1 x 8: the same global batch, so the same samples per step.
    layout = ["--resume_from_checkpoint", str(tmp_path / "ranks" / "sft_train" / "checkpoint-1")]
    resumed = train(setup, tmp_path / "one", *common, *layout, "--sft_train.training_args.per_device_train_batch_size", "8")
    assert "note: resuming the layout 8 (2 processes" in resumed.stdout + resumed.stderr
    reference = weights(tmp_path / "bs8", 2)
    for other in ("ga8", "ranks", "one"):
        assert_close_weights(reference, weights(tmp_path / other, 2), other)
        for step, loss in losses(tmp_path / other).items():  # "one" logs only the step it trained, 2
            assert loss == pytest.approx(losses(tmp_path / "bs8")[step], rel=1e-5)
    # Another global batch (1 x 4) is refused, naming a layout that keeps it.
    other = train(setup, tmp_path / "half", *common, *layout, "--sft_train.training_args.per_device_train_batch_size", "4",
                  check=False)
    assert other.returncode == 1 and "Traceback" not in other.stderr, other.stderr[-3000:]
    assert "global batch of 8" in other.stderr and "(e.g. gradient_accumulation_steps 2)" in other.stderr


FRESH_LOSS = """
import json, sys, torch
sys.path.insert(0, {root!r})
from sft.data.pipeline import load_encoded
from transformers import AutoModelForCausalLM
from sft.data.collate import pad_collate
from sft.train.modeling import loss_sum
{load}
data = load_encoded({data!r})
total = count = 0
with torch.no_grad():
    for start in range(0, len(data), 3):
        rows = data[start:start + 3]
        batch = pad_collate([{{"input_ids": i, "labels": l}} for i, l in zip(rows["input_ids"], rows["labels"])], 0)
        summed, n = loss_sum(model, batch)
        total += float(summed); count += n
print(json.dumps(total / count))
"""
LOAD_MODEL = "model = AutoModelForCausalLM.from_pretrained({folder!r}, dtype=torch.float32)"


def fresh_process_val_loss(out, step, load=LOAD_MODEL):
    """The validation loss of checkpoint ``step``'s model folder, loaded by ``load`` in a fresh process; and the
    run's logged one."""
    folder = os.path.join(str(out), "sft_train", f"checkpoint-{step}", "sft_train")
    data = glob.glob(os.path.join(str(out), "encoded", "*", "validation"))[0]
    script = FRESH_LOSS.format(root=ROOT, load=load.format(folder=folder), data=data)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), dict(logged(out, "val/loss"))[step]


STRATEGIES = {
    "ddp": ["--sft_train.strategy_args.strategy_name", "ddp_train"],
    "zero2": ["--sft_train.strategy_args.strategy_name", "deepspeed_train",
              "--sft_train.strategy_args.strategy_config", "{zero_stage: 2}"],
    "zero3": ["--sft_train.strategy_args.strategy_name", "deepspeed_train",
              "--sft_train.strategy_args.strategy_config", "{zero_stage: 3}"],
    "fsdp2": ["--sft_train.strategy_args.strategy_name", "fsdp2_train"],
}


ANSWERED = 7  # validation samples answered at the step-4 evaluation: 2 ranks x batches of 3 take 2 and 1 calls


def train_with(setup, out, strategy, processes=2):
    # 1 process x batch 8 or 2 x 4: the same global batch, so the same samples and losses at each step.
    train(setup, out, *STRATEGIES[strategy], "--sft_train.training_args.max_steps", "4", "--save_steps", "2",
          "--sft_train.training_args.per_device_train_batch_size", str(8 // processes),
          "--validation.generate_samples", str(ANSWERED), "--validation.max_new_tokens", "12", processes=processes)
    return losses(out)


def greedy_answers(out, step, prompts, max_new_tokens=12):
    """Checkpoint ``step``'s model answering each prompt alone (no padding, no batch), greedily, up to <|im_end|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.join(str(out), "sft_train", f"checkpoint-{step}", "sft_train")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)[0, ids.shape[1]:].tolist()
        answers.append(tokenizer.decode(new[:next((i for i, t in enumerate(new) if t in stops), len(new))]))
    return answers


@pytest.fixture(scope="module")
def ddp_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, train_with(setup, out, "ddp")


CASES = {"ddp": ("ddp", 2), "zero2": ("zero2", 2), "zero3": ("zero3", 2), "fsdp2": ("fsdp2", 2),
         "zero2-1-process": ("zero2", 1), "zero3-1-process": ("zero3", 1)}


@pytest.mark.parametrize("case", CASES)
def test_strategies_give_the_same_losses_and_loadable_checkpoints(setup, tmp_path, case, ddp_run):
    strategy, processes = CASES[case]
    reference_out, reference = ddp_run
    out = reference_out if case == "ddp" else tmp_path / case
    got = reference if case == "ddp" else train_with(setup, out, strategy, processes)
    assert sorted(got) == [1, 2, 3, 4]
    # The strategy really ran: DeepSpeed keeps its own partitioned checkpoint (Accelerate on CPU would drop it silently).
    state = os.listdir(os.path.join(str(out), "sft_train", "checkpoint-4", "training_state"))
    assert ("pytorch_model" in state) == strategy.startswith("zero"), state
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), (case, step)
    # Validation answers under every strategy: the first ANSWERED samples, in order, the same greedy answers; under
    # ZeRO-3 (sharded parameters, every rank in every forward) those of the saved model answering one by one.
    ((step, answers),) = logged(out, "val/answers")
    assert step == 4 and [answer["index"] for answer in answers] == list(range(ANSWERED))
    assert answers == logged(reference_out, "val/answers")[0][1], case
    assert dict(logged(out, "val/exact_match"))[4] == sum(answer["match"] for answer in answers) / ANSWERED
    assert all(answer["prompt"].endswith("<|im_start|>assistant\n") and " plus " in answer["reference"] for answer in answers)
    if case == "zero3":
        assert [a["answer"] for a in answers] == greedy_answers(out, 4, [a["prompt"] for a in answers])
    if case != "zero2-1-process":
        # The saved HF model, loaded in a fresh process, gives the live model's validation loss.
        fresh, live = fresh_process_val_loss(out, 4)
        assert fresh == pytest.approx(live, rel=1e-5)
    if case in ("fsdp2", "zero2"):
        # The step-2 checkpoint of 2 processes resumed by one (batch 8): FSDP2 reshards it (DCP) and ends where the
        # 2-process run ended; DeepSpeed's partitioned state is refused, naming the fix.
        resumed = train(setup, tmp_path / "one", *STRATEGIES[strategy], "--sft_train.training_args.max_steps", "4",
                        "--sft_train.training_args.per_device_train_batch_size", "8", "--resume_from_checkpoint",
                        str(out / "sft_train" / "checkpoint-2"), check=strategy == "fsdp2")
        if strategy == "fsdp2":
            assert_close_weights(weights(out, 4), weights(tmp_path / "one", 4), case)
        else:
            assert resumed.returncode == 1 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
            assert "written by 2 processes under deepspeed_train" in resumed.stderr
            assert "launch --num_processes 2" in resumed.stderr


def test_sigterm_finishes_the_step_saves_and_exits_cleanly(setup, tmp_path):
    root, config = setup
    out = tmp_path / "term"
    # With a loader worker, and the signal sent to the whole process group as Slurm does: the worker ignores it.
    process = subprocess.Popen(command(config, out, "--sft_train.training_args.max_steps", "100000", "--save_steps", "100000",
                                       "--eval_steps", "100000", "--sft_train.training_args.dataloader_num_workers", "1"),
                               cwd=ROOT, env=environment(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    metrics = out / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "received SIGTERM" in output
    from sft.train import checkpoint as ckpt

    saved = ckpt.complete_checkpoints(str(out))
    assert len(saved) == 1 and saved[0][0] >= 3
    assert ckpt.read_state(saved[0][1])["step"] == saved[0][0]


def test_metrics_reach_tensorboard_jsonl_and_the_log(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    result = train(setup, out)
    events = glob.glob(os.path.join(str(out), "tb", "**", "events.out.tfevents.*"), recursive=True)
    tags = set()
    for path in events:
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    for tag in ("train/loss", "train/grad_norm", "train/lr", "val/loss", "perf/tokens_per_second", "perf/padding_ratio",
                "perf/supervised_fraction", "time/forward_backward", "time/checkpoint", "memory/peak_gib"):
        assert tag in tags, tag
    log = (out / "logs" / "train.log").read_text()
    assert "step 00008 (100.0%) | loss" in log and "val loss" in log and "summary:" in log
    assert "summary:" in result.stdout + result.stderr


def test_the_demo_config_runs_and_prints_answers(tmp_path):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", os.path.join(ROOT, "scripts", "train.py"), "--config_path", "configs/demo.yaml",
         "--output_dir", str(out), "--logging_dir", str(out / "logs"), "--track_with", "none",
         "--sft_train.training_args.max_steps", "20", "--eval_steps", "10", "--save_steps", "20"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "val loss" in output and "before:" in output and "after:" in output
    assert (out / "sft_train" / "checkpoint-20" / "COMPLETE").exists()


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_nan_loss_stops_naming_the_step_or_is_skipped(setup, tmp_path, policy):
    # An absurd learning rate sends the weights to infinity after the first update.
    result = train(setup, tmp_path / policy, "--sft_train.training_args.learning_rate", "1e30",
                   "--sft_train.training_args.warmup_steps", "0", "--sft_train.training_args.on_nan", policy,
                   "--sft_train.training_args.max_steps", "4", "--max_grad_norm", "0", check=False)
    output = result.stdout + result.stderr
    if policy == "error":
        assert result.returncode == 1 and "Traceback" not in output and "the loss is NaN or infinite" in output
        assert "error: step 2:" in output or "error: step 3:" in output
    else:
        assert result.returncode == 0, output[-3000:]
        assert "skipped (NaN)" in output


def test_device_mapping_wider_than_the_machine_is_refused(setup, tmp_path):
    result = train(setup, tmp_path / "map", "--sft_train.device_mapping", "[0]", check=False, processes=2)
    assert result.returncode != 0 and "device_mapping names 1 device(s) but 2 processes" in result.stdout + result.stderr


def test_packing_changes_nothing_but_speed(setup, tmp_path):
    """Packing changes nothing, end to end: one step over all 40 samples, unpacked vs packed offline vs packed online."""
    root, config = setup
    packed_dir = tmp_path / "packed"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "pack.py"), "--config_path", config,
                             "--output_dir", str(tmp_path / "enc"), "--out", str(packed_dir)],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    rows = int(result.stdout.split(" into ")[1].split(" rows")[0])
    assert rows < 40 and "lower bound" in result.stdout and "fill ratio" in result.stdout
    # A large AdamW epsilon makes the first update smooth in the gradient (lr * g / (|g| + eps)) rather than
    # sign-like, so float32 rounding of tiny gradients cannot flip whole steps.
    one_step = ["--sft_train.training_args.max_steps", "1", "--save_steps", "1", "--eval_steps", "100",
                "--sft_train.training_args.adam_epsilon", "1.0", "--sft_train.training_args.learning_rate", "0.5"]
    train(setup, tmp_path / "unpacked", *one_step, "--sft_train.training_args.per_device_train_batch_size", "40")
    train(setup, tmp_path / "offline", *one_step, "--sft_train.training_args.per_device_train_batch_size", str(rows),
          "--sft_train.data_args.encoded_path", str(packed_dir))
    online = train(setup, tmp_path / "online", *one_step, "--sft_train.training_args.per_device_train_batch_size",
                   str(rows), "--sft_train.use_sequence_packing", "true")
    assert f"into {rows} rows" in online.stdout + online.stderr and "fill ratio" in online.stdout + online.stderr
    reference = weights(tmp_path / "unpacked", 1)
    for other in ("offline", "online"):
        candidate = weights(tmp_path / other, 1)
        for name in reference:
            assert torch.allclose(reference[name], candidate[name], rtol=1e-5, atol=1e-6), (other, name)
        assert losses(tmp_path / other)[1] == pytest.approx(losses(tmp_path / "unpacked")[1], rel=1e-5)


def test_resume_is_checked_against_the_run_state(setup, tmp_path):
    """A resume is checked against the run, end to end, one process: what changed is named, an override accepts it, max_steps raised trains
    further on the documented schedule, the log goes on from the checkpoint, and a new run starts a new log."""
    root, config = setup
    out = tmp_path / "run"
    two = ["--sft_train.training_args.max_steps", "2", "--save_steps", "2", "--eval_steps", "100"]
    train(setup, out, *two)

    def refused(*overrides):
        result = train(setup, out, *two, "--resume_from_checkpoint", "true", *overrides, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        return result.stderr

    message = refused("--cluster_name", "other")
    assert "error: cluster_name: checkpoint" in message and "this run's cluster_name is 'other'" in message
    assert "other sequence_length (96, now 128)" in refused("--sequence_length", "128")
    other_rows = root / "other.jsonl"
    other_rows.write_text("\n".join(json.dumps(r) for r in ROWS[2:42]) + "\n")
    message = refused("--sft_train.data_args.file_name", str(other_rows))
    assert "trained with other data (" in message and "--resume_accept_changes data" in message
    # Accepted, and trained further: max_steps 2 -> 4 re-stretches the decay over 4 steps, warmup (2) kept.
    accepted = train(setup, out, "--sft_train.training_args.max_steps", "4", "--save_steps", "2", "--eval_steps", "100",
                     "--resume_from_checkpoint", "true", "--sft_train.data_args.file_name", str(other_rows),
                     "--resume_accept_changes", "data")
    output = accepted.stdout + accepted.stderr
    assert "note: accepted a changed data" in output and "note: total steps 2 -> 4" in output
    from sft.train.schedule import lr_at

    assert dict(logged(out, "train/lr"))[3] == pytest.approx(lr_at(2, 4, 1e-3, 2, "cosine", 0.0))
    assert [step for step, _ in logged(out, "train/loss")] == [1, 2, 3, 4]
    tokens = dict(logged(out, "train/tokens_seen"))
    assert tokens[1] < tokens[2] < tokens[3] < tokens[4]
    assert json.load(open(out / "sft_train" / "checkpoint-4" / "run_state.json"))["samples"] == 16
    # A run that does not resume starts its own metrics.jsonl.
    train(setup, out, "--sft_train.training_args.max_steps", "1", "--save_steps", "1", "--eval_steps", "100")
    assert [step for step, _ in logged(out, "train/loss")] == [1]
