"""The local cluster the Python tests share: one `moemesh up` serving the
Mixtral golden fixture for the whole session (fixtures `cluster`, `client`
through its router, and `one_hop_client` following its coordinators).

Needs the moemesh binary: MOEMESH_BIN, or target/debug/moemesh of this
repository.
"""

import os
import queue
import signal
import subprocess
import threading
from pathlib import Path

import pytest

import moemesh

REPO = Path(__file__).resolve().parents[3]
MIXTRAL = REPO / "tests" / "fixtures" / "mixtral"
# A cold debug cluster on a busy 2-core machine loads slowly.
STARTUP_SECONDS = 600


class Cluster:
    """A `moemesh up` process and what it printed."""

    def __init__(self, process, router, coordinators, cluster_secret):
        self.process = process
        self.router = router
        self.coordinators = coordinators
        self.cluster_secret = cluster_secret

    def client(self, **options):
        return moemesh.Client(self.router, cluster_secret=self.cluster_secret, **options)

    def one_hop_client(self, **options):
        options.setdefault("checkpoint", MIXTRAL)
        return moemesh.Client(
            coordinator=self.coordinators, cluster_secret=self.cluster_secret, **options
        )


def start_cluster(log_path):
    """Starts `moemesh up` on the Mixtral fixture and reads its stdout up to
    the cluster secret, the last line it prints once the cluster serves."""
    binary = os.environ.get("MOEMESH_BIN", str(REPO / "target" / "debug" / "moemesh"))
    arguments = [
        binary, "up", "--model", str(MIXTRAL), "--expert-nodes", "2",
        "--router-addr", "127.0.0.1:0", "--threads-per-node", "1",
    ]
    # Without the caller's MOEMESH_* settings: the cluster makes its own secret.
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("MOEMESH_")}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            arguments, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
            env=environment, text=True,
        )
    lines = queue.Queue()

    def read_lines():
        for line in process.stdout:
            lines.put(line.strip())
        lines.put(None)  # it closed its stdout: it exited

    threading.Thread(target=read_lines, daemon=True).start()
    router, coordinators, secret = None, None, None
    while secret is None:
        try:
            line = lines.get(timeout=STARTUP_SECONDS)
        except queue.Empty:
            line = None
        if line is None:
            stop_cluster(process)
            raise RuntimeError(f"moemesh up did not start; its log:\n{Path(log_path).read_text()}")
        if line.startswith("router "):
            router = line.split(" ", 1)[1]
        elif line.startswith("export MOEMESH_COORDINATOR="):
            coordinators = line.split("=", 1)[1].strip("'")
        elif line.startswith("export MOEMESH_CLUSTER_SECRET="):
            secret = line.split("=", 1)[1]
    assert router, "moemesh up printed no router URL"
    assert coordinators, "moemesh up printed no coordinator URLs"
    return Cluster(process, router, coordinators, secret)


def stop_cluster(process):
    """SIGTERM, then SIGKILL if it lingers; its members exit with it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    started = start_cluster(tmp_path_factory.mktemp("moemesh") / "up.log")
    yield started
    stop_cluster(started.process)


@pytest.fixture(scope="session")
def client(cluster):
    return cluster.client()


@pytest.fixture(scope="session")
def one_hop_client(cluster):
    return cluster.one_hop_client()
