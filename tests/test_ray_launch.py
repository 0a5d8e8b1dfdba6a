"""launch/ray_launch.py on a real two-node Ray cluster started on this machine (loopback only)."""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.test_train import kill_tree, setup  # noqa: F401  (the tiny model and data fixture)

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Token authentication on, as a user should start a cluster; the token stays in this environment (no file
    # under the user's ~/.ray).
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    port = free_port()
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    subprocess.run([RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false", *common],
                   check=True, capture_output=True, env=env)
    try:
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", *common], check=True, capture_output=True,
                       env=env)
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env)


def launch(cluster, config, out, *overrides):
    address, env = cluster
    return [sys.executable, os.path.join(ROOT, "launch", "ray_launch.py"), "--num_nodes", "2", "--address", address,
            config, "--output_dir", str(out), "--logging_dir", str(out / "logs"), "--track_with", "none", *overrides]


def test_two_nodes_train_and_checkpoint(cluster, setup, tmp_path):  # noqa: F811
    root, config = setup
    out = tmp_path / "ray"
    result = subprocess.run(launch(cluster, config, out, "--sft_train.training_args.max_steps", "2",
                                   "--save_steps", "2", "--eval_steps", "2"),
                            capture_output=True, text=True, env=cluster[1], timeout=600, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "[node 0]" in output and "[node 1]" in output and "all nodes finished" in output
    assert "2 process(es)" in output  # one rank per node, one process group
    assert (out / "sft_train" / "checkpoint-2" / "COMPLETE").exists()
    assert (out / "sft_train" / "checkpoint-2" / "sft_train" / "model.safetensors").exists()


def test_a_failing_node_stops_the_job_quickly_without_orphans(cluster, setup, tmp_path):  # noqa: F811
    root, config = setup
    out = tmp_path / "ray-fail"
    process = subprocess.Popen(launch(cluster, config, out, "--sft_train.training_args.max_steps", "100000",
                                      "--save_steps", "100000", "--eval_steps", "100000"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cluster[1], cwd=ROOT)
    pids, lines = {}, []
    deadline = time.time() + 300
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("[launcher] node "):
            pids[int(line.split()[2])] = int(line.rsplit(" ", 1)[1])
        if "[node 1] step 0000" in line or ("[node 0] step 0000" in line and len(pids) == 2):
            break
    assert len(pids) == 2, "".join(lines)[-3000:]
    killed_at = time.time()
    kill_tree(pids[1])  # node 1 dies
    output, _ = process.communicate(timeout=120)
    elapsed = time.time() - killed_at
    assert process.returncode != 0
    assert "node 1 exited with status" in output and elapsed < 60, (elapsed, output[-3000:])
    time.sleep(1)
    leftovers = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], leftovers


def test_a_launcher_without_the_clusters_token_is_refused_in_one_line(cluster, setup, tmp_path):  # noqa: F811
    root, config = setup
    address, env = cluster
    stranger = dict(env, RAY_AUTH_TOKEN=secrets.token_hex(32))
    result = subprocess.run(launch(cluster, config, tmp_path / "out"), capture_output=True, text=True, env=stranger,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot connect to the Ray cluster at {address}: ")
    assert "needs the same token here" in errors[0] and not (tmp_path / "out").exists()


def test_authentication_is_turned_off_only_when_the_network_is_declared_trusted():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ray_launch", os.path.join(ROOT, "launch", "ray_launch.py"))
    ray_launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ray_launch)
    assert ray_launch.auth_environment(False) == {}  # Ray's default stays: token authentication where it has one
    assert ray_launch.auth_environment(True) == {"RAY_AUTH_MODE": "disabled"}
    assert ray_launch.parse_args(["--num_nodes", "1", "c.yaml"]).trusted_network is False


@pytest.mark.parametrize("mapping, processes", [(None, 1), ("[0,1]", 2)])
def test_run_sft_helper_picks_processes_from_device_mapping(setup, tmp_path, mapping, processes):  # noqa: F811
    root, config = setup
    out = tmp_path / "helper"
    extra = ["--sft_train.device_mapping", mapping] if mapping else []
    env = dict(os.environ, PYTHON=sys.executable, MAIN_PROCESS_PORT=str(free_port()), OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", os.path.join(ROOT, "launch", "run_sft.sh"), config, "--output_dir", str(out),
                             "--logging_dir", str(out / "logs"), "--track_with", "none",
                             "--sft_train.training_args.max_steps", "2", *extra],
                            capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"run_sft: {processes} process(es)" in output and f"{processes} process(es) |" in output
    assert (out / "sft_train" / "checkpoint-2" / "COMPLETE").exists()
