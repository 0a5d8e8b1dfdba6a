"""Multi-node training on a Ray cluster: one actor per node, each running `accelerate launch scripts/train.py`.

    python launch/ray_launch.py --num_nodes 2 --address 10.0.0.1:6379 configs/X.yaml --sft_train.training_args.max_steps 100
    python launch/ray_launch.py --num_nodes 1 configs/demo.yaml          # no --address: a local one-node cluster

A placement group with one bundle per node (STRICT_SPREAD) puts each actor on its own node with
``--gpus_per_node`` GPUs; actor i runs accelerate with ``--machine_rank i``, and the first actor's node IP
is the main process address. Output streams back prefixed by node. If any node's training exits non-zero,
the others are stopped (their whole process groups) and this launcher exits non-zero; Ctrl-C stops all.
The repository must be at the same path on every node (a shared file system), as with Slurm. No
dashboard is started; the only port opened beyond Ray's own is accelerate's rendezvous port.

Ray's token authentication is left as Ray sets it: on for a local cluster, and on for ``--address`` when
``RAY_AUTH_MODE=token`` or a token is found (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``). Without it anyone who reaches the cluster's ports can run code on every node:
``--trusted_network`` says so explicitly and sets ``RAY_AUTH_MODE=disabled`` for a cluster started that way.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_nodes", type=int, required=True, help="nodes (one actor and one machine_rank each)")
    parser.add_argument("--address", default=None, help="Ray cluster address; default: start a local one-node cluster")
    parser.add_argument("--gpus_per_node", type=int, default=None,
                        help="GPUs (= processes) per node; default: the fewest GPUs of any node (0: one CPU process)")
    parser.add_argument("--port", type=int, default=0, help="accelerate's main process port; 0 picks a free one")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the nodes to be placed")
    parser.add_argument("--trusted_network", action="store_true",
                        help="connect without Ray's token authentication (RAY_AUTH_MODE=disabled), to a cluster "
                             "started without it on a network where everyone who can reach it may run code on it")
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted overrides passed to scripts/train.py")
    return parser.parse_args(argv)


class NodeRunner:
    """Runs one node's `accelerate launch` in its own process group and hands back its output lines."""

    def __init__(self):
        self.process = None
        self.lines = []

    def address(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket() as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def gpu_count(self) -> int:
        import ray

        return len(ray.get_gpu_ids())

    def start(self, command: list[str], env: dict) -> int:
        import subprocess
        import threading

        self.process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def pump():
            for line in self.process.stdout:
                self.lines.append(line.rstrip("\n"))

        threading.Thread(target=pump, daemon=True).start()
        return self.process.pid

    def poll(self) -> tuple[list[str], int | None]:
        lines, self.lines = self.lines, []
        return lines, self.process.poll()

    def stop(self, grace: float) -> None:
        """Stop the node's whole process group: SIGTERM (checkpoint and exit), SIGKILL after ``grace`` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=grace)
        except Exception:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def auth_environment(trusted_network: bool) -> dict:
    """What the launcher sets for Ray's authentication: nothing (Ray's own default, token authentication where
    a token exists) unless the user declared the network trusted."""
    return {"RAY_AUTH_MODE": "disabled"} if trusted_network else {}


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def node_command(rank: int, nodes: int, per_node: int, main_ip: str, port: int, config: str,
                 overrides: list[str]) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", str(nodes),
               "--machine_rank", str(rank), "--main_process_ip", main_ip, "--main_process_port", str(port),
               "--num_processes", str(nodes * per_node), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if nodes * per_node > 1:
        command.append("--multi_gpu")
    return command + [os.path.join(ROOT, "scripts", "train.py"), "--config_path", config, *overrides]


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    os.environ.update(auth_environment(args.trusted_network))
    if args.address:
        try:
            ray.init(address=args.address, log_to_driver=False)
        except Exception as error:  # refused token, no token, unreachable: one line that says what to do
            print(f"error: cannot connect to the Ray cluster at {args.address}: {first_line(error)}. A cluster "
                  "started with RAY_AUTH_MODE=token needs the same token here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                  "~/.ray/auth_token); one started without authentication needs --trusted_network", file=sys.stderr)
            return 1
    else:
        if args.num_nodes != 1:
            print("error: without --address only --num_nodes 1 (a local cluster) is possible", file=sys.stderr)
            return 2
        ray.init(include_dashboard=False, log_to_driver=False)
    gpus = args.gpus_per_node
    if gpus is None:  # the fewest GPUs any live node has
        alive = [node for node in ray.nodes() if node["Alive"]]
        gpus = int(min((node["Resources"].get("GPU", 0) for node in alive), default=0))
    bundle = {"CPU": 1, **({"GPU": gpus} if gpus else {})}
    group = placement_group([bundle] * args.num_nodes, strategy="STRICT_SPREAD")
    try:
        ray.get(group.ready(), timeout=args.timeout)
    except Exception:
        print(f"error: could not place {args.num_nodes} nodes with {bundle} each (STRICT_SPREAD) within "
              f"{args.timeout:.0f}s; the cluster has {ray.cluster_resources()}", file=sys.stderr)
        return 1
    Runner = ray.remote(NodeRunner)
    actors = [Runner.options(num_cpus=1, num_gpus=gpus,
                             scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
                             ).remote() for i in range(args.num_nodes)]
    main_ip = ray.get(actors[0].address.remote())
    port = args.port or ray.get(actors[0].free_port.remote())
    per_node = max(1, gpus)
    env = {} if gpus > 0 else {"ACCELERATE_USE_CPU": "1"}
    config = os.path.abspath(args.config)
    for rank, actor in enumerate(actors):
        command = node_command(rank, args.num_nodes, per_node, main_ip, port, config, args.overrides)
        pid = ray.get(actor.start.remote(command, env))
        print(f"[launcher] node {rank} at {ray.get(actor.address.remote())} runs pid {pid}", flush=True)
    print(f"[launcher] {args.num_nodes} node(s) x {per_node} process(es), main process {main_ip}:{port}", flush=True)

    status = {}
    interrupted = False
    grace = 5.0  # after a node failure the others block in collectives: stop them promptly
    try:
        while len(status) < len(actors):
            for rank, actor in enumerate(actors):
                if rank in status:
                    continue
                lines, code = ray.get(actor.poll.remote())
                for line in lines:
                    print(f"[node {rank}] {line}", flush=True)
                if code is not None:
                    status[rank] = code
                    if code != 0:
                        raise RuntimeError(f"node {rank} exited with status {code}")
            time.sleep(0.2)
    except KeyboardInterrupt:
        interrupted, grace = True, 60.0  # let every node finish its step and save a checkpoint
        print("[launcher] interrupted: stopping every node", file=sys.stderr, flush=True)
    except RuntimeError as error:
        print(f"[launcher] {error}: stopping the other nodes", file=sys.stderr, flush=True)
    finally:
        ray.get([actor.stop.remote(grace) for actor in actors])
        for rank, actor in enumerate(actors):
            lines, code = ray.get(actor.poll.remote())
            for line in lines:
                print(f"[node {rank}] {line}", flush=True)
            status.setdefault(rank, code)
        remove_placement_group(group)
        ray.shutdown()
    failed = {rank: code for rank, code in status.items() if code != 0}
    if interrupted or failed:
        print(f"[launcher] failed: {failed or 'interrupted'}", file=sys.stderr)
        return 1
    print("[launcher] all nodes finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
