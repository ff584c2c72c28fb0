"""A real multi-node Ray cluster on 127.0.0.1: a head and worker nodes started with `ray start`,
as users start one without Kubernetes, and killed by pid as a lost machine would be.

Every node has its own temp dir (its Unix sockets live there: two nodes in one dir collide) and
its own ports, and runs in its own session, so killing one leaves the rest, and the test
session's own `ray.init()` instance, alone. The cluster uses token authentication with a token
of its own (`RAY_AUTH_TOKEN_PATH`): joining it then needs what users on such a cluster need.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

START_TIMEOUT_S = 90
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    log: Path

    def tree(self) -> list[psutil.Process]:
        """The node's processes: `ray start --block`, its raylet, object store, agents and workers."""
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


@dataclass
class RayNodes:
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="strata-nodes-", dir="/tmp")))
    nodes: list[Node] = field(default_factory=list)
    gcs: str = ""

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to join the cluster as a user's would: its address and the token's
        place (strata finds the token itself, as Ray's own `ray start --head` does)."""
        return {**os.environ, "RAY_ADDRESS": self.gcs, "RAY_AUTH_TOKEN_PATH": str(self.root / "token")}

    def start_head(self, cpus: int = 0) -> Node:
        (self.root / "token").write_text(secrets.token_hex(32))
        port = free_port()
        self.gcs = f"127.0.0.1:{port}"
        node = self._start("head", cpus, ["--head", f"--port={port}", "--include-dashboard=false",
                                          f"--ray-client-server-port={free_port()}"], {})
        self._wait(lambda: _answers(port), node, "the head's GCS to answer")
        return node

    def add_worker(self, cpus: int) -> Node:
        before = self.alive()
        # worker nodes take the cluster's token only when told to (Ray 2.60: the head finds it alone)
        node = self._start(f"worker{len(self.nodes)}", cpus, [f"--address={self.gcs}"], {"RAY_AUTH_MODE": "token"})
        self._wait(lambda: self.alive() > before, node, "the node to join")
        return node

    def _start(self, name: str, cpus: int, args: list[str], env: dict[str, str]) -> Node:
        ports = {flag: free_port() for flag in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                                "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                "runtime-env-agent-port")}
        temp = self.root / name
        temp.mkdir()
        log = self.root / f"{name}.log"
        process = subprocess.Popen(
            [os.path.join(BIN, "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
             "--object-store-memory=100000000", "--disable-usage-stats", f"--temp-dir={temp}", *args,
             *(f"--{flag}={port}" for flag, port in ports.items())],
            env={**self.env, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, process, log)
        self.nodes.append(node)
        return node

    def _wait(self, ready, node: Node, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if node.process.poll() is not None:
                raise RuntimeError(f"ray start ({node.name}) exited with {node.process.returncode}:\n"
                                   f"{node.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {START_TIMEOUT_S} s for {what}:\n{node.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def alive(self) -> int:
        """Raylets running: one per live node."""
        return sum(1 for node in self.nodes for p in node.tree() if _is_raylet(p))

    def node_of(self, process: psutil.Process) -> Node | None:
        pids = {p.pid for p in process.parents()} | {process.pid}
        return next((node for node in self.nodes if node.process.pid in pids), None)

    def kill(self, node: Node) -> None:
        """SIGKILL every process of the node at once: a machine that is gone."""
        for process in node.tree():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        node.process.wait(10)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            try:
                os.killpg(node.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.kill(node)
        for process in psutil.process_iter(["cmdline"]):  # workers that left the node's process group
            if any(str(self.root) in part for part in process.info["cmdline"] or []):
                process.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _is_raylet(process: psutil.Process) -> bool:
    try:
        return process.name() == "raylet"
    except psutil.Error:
        return False
