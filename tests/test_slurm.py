"""launch/slurm templates on a real Slurm cluster (slurmctld + two slurmd) started on this machine."""

import os
import re
import subprocess
import sys
import time

import pytest
from pathlib import Path

from tests.conftest import ROOT
from tests.test_train import kill_tree, setup  # noqa: F401  (the tiny model and data fixture)

HARNESS = os.path.join(ROOT, "tests", "slurm_cluster.sh")
STATE = "/tmp/sft-slurm-tests"


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the Slurm tests need root (they start slurmctld and slurmd)")
        pytest.skip("the Slurm tests need root")
    env = dict(os.environ, SFT_SLURM_DIR=STATE)
    started = subprocess.run(["bash", HARNESS, "start", "2"], capture_output=True, text=True, env=env)
    assert started.returncode == 0, started.stderr[-3000:]
    env["SLURM_CONF"] = f"{STATE}/slurm.conf"
    try:
        yield env
    finally:
        subprocess.run(["bash", HARNESS, "stop"], capture_output=True, env=env)


def submit(env, template, config, out, *overrides, nodes=2):
    command = ["sbatch", "--parsable", "--nodes", str(nodes), "--output", str(out / "job-%j.out"),
               "--export", f"ALL,SFT_PYTHON={sys.executable},SFT_LOG_DIR={out / 'logs'},OMP_NUM_THREADS=1",
               os.path.join(ROOT, "launch", "slurm", template), config, "--output_dir", str(out),
               "--logging_dir", str(out / "train-logs"), "--track_with", "none", *overrides]
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return result.stdout.strip().split(";")[0]


def job_state(env, job):
    line = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=env).stdout
    state = re.search(r"JobState=(\w+)", line)
    restarts = re.search(r"Restarts=(\d+)", line)
    return (state[1] if state else ""), int(restarts[1]) if restarts else 0


def wait(env, job, timeout=400):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state, _ = job_state(env, job)
        if state and state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"):
            return state
        time.sleep(0.3)
    raise AssertionError(f"job {job} still {state} after {timeout}s")


def start_long_run(env, config, out, steps, logged):
    """Submit a multi-node run of ``steps`` steps without checkpoints and wait until ``logged`` steps are logged."""
    job = submit(env, "sft_multi_node.sbatch", config, out, "--sft_train.training_args.max_steps", str(steps),
                 "--save_steps", "100000", "--eval_steps", "100000")
    metrics = out / "train-logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < logged):
        time.sleep(0.1)
    return job


def logs(out):
    return "\n".join(p.read_text() for p in sorted(out.rglob("*.out")))


def test_multi_node_template_trains_on_two_nodes(slurm, setup, tmp_path):  # noqa: F811
    root, config = setup
    out = tmp_path / "multi"
    job = submit(slurm, "sft_multi_node.sbatch", config, out, "--sft_train.training_args.max_steps", "2",
                 "--save_steps", "2")
    assert wait(slurm, job) == "COMPLETED", logs(out)[-5000:]
    assert (out / "sft_train" / "checkpoint-2" / "sft_train" / "model.safetensors").exists()
    per_node = sorted(p.name for p in (out / "logs").glob("*.out"))
    assert per_node == [f"sft-{job}-node0.out", f"sft-{job}-node1.out"], per_node
    assert "2 process(es) |" in logs(out)


def test_single_node_template(slurm, setup, tmp_path):  # noqa: F811
    root, config = setup
    out = tmp_path / "single"
    job = submit(slurm, "sft_single_node.sbatch", config, out, "--sft_train.training_args.max_steps", "2",
                 "--save_steps", "2", nodes=1)
    assert wait(slurm, job) == "COMPLETED", logs(out)[-5000:]
    assert (out / "sft_train" / "checkpoint-2" / "COMPLETE").exists()


def test_preemption_checkpoints_requeues_and_resumes(slurm, setup, tmp_path):  # noqa: F811
    root, config = setup
    out = tmp_path / "preempt"
    job = start_long_run(slurm, config, out, steps=40, logged=3)  # ~30 s of steps left when SIGTERM comes
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], check=True, env=slurm)
    # Slurm holds a requeued job until a begin time about two minutes on; start it as soon as it waits for that.
    deadline = time.time() + 300
    while time.time() < deadline:
        state, restarts = job_state(slurm, job)
        if restarts >= 1 and state == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, capture_output=True)
            break
        if state not in ("RUNNING", "COMPLETING", "REQUEUED", "PENDING", "CONFIGURING"):
            break
        time.sleep(0.3)
    assert wait(slurm, job, timeout=600) == "COMPLETED", logs(out)[-5000:]
    _, restarts = job_state(slurm, job)
    text = logs(out)
    assert restarts >= 1 and "received SIGTERM" in text and "resumed from" in text, text[-5000:]
    assert (out / "sft_train" / "checkpoint-40" / "COMPLETE").exists()


def test_a_failing_node_fails_the_job_quickly_without_orphans(slurm, setup, tmp_path):  # noqa: F811
    root, config = setup
    out = tmp_path / "fail"
    job = start_long_run(slurm, config, out, steps=100000, logged=2)
    victims = subprocess.run(["pgrep", "-f", f"machine_rank 1 .*{out}"], capture_output=True, text=True).stdout.split()
    if not victims:  # the rank's own command line, through bash -c
        victims = [p for p in subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
                   if "SLURM_NODEID=1" in open(f"/proc/{p}/environ", "rb").read().decode(errors="replace").replace("\0", "\n")]
    assert victims, "no process of node 1 found"
    killed_at = time.time()
    for pid in victims:
        kill_tree(int(pid))
    state = wait(slurm, job, timeout=300)
    assert state in ("FAILED", "CANCELLED", "NODE_FAIL") and time.time() - killed_at < 90, state
    time.sleep(1)
    assert subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split() == []


def test_export_none_still_finds_path_and_python(slurm, setup, tmp_path):  # noqa: F811
    """With --export=NONE the batch script starts without PATH or the submitter's variables."""
    venv = next((v for v in (".venv", ".ci-venv") if os.path.exists(os.path.join(ROOT, v, "bin", "python"))), None)
    if venv is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(".ci-venv is missing")
        pytest.skip("no .venv or .ci-venv in the repository for the template to find")
    root, config = setup
    out = tmp_path / "none"
    out.mkdir()
    result = subprocess.run(["sbatch", "--parsable", "--nodes", "2", "--export", "NONE", "--output", str(out / "job-%j.out"),
                             os.path.join(ROOT, "launch", "slurm", "sft_multi_node.sbatch"), config,
                             "--output_dir", str(out), "--track_with", "none", "--logging_dir", str(out / "train-logs"),
                             "--sft_train.training_args.max_steps", "2", "--save_steps", "2"],
                            capture_output=True, text=True, env=slurm, cwd=ROOT, check=True)
    job = result.stdout.strip().split(";")[0]
    assert wait(slurm, job) == "COMPLETED", logs(out)[-5000:] + logs(Path(ROOT) / "logs")[-3000:]
    assert (out / "sft_train" / "checkpoint-2" / "COMPLETE").exists()
