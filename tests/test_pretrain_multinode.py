"""One pretraining job across two torchrun launches (``--nnodes 2``, 2 ranks each, TP=2 x PP=2) on this
machine: it completes and its per-step losses equal a single-node ``torchrun --standalone
--nproc_per_node 4`` run of the same flags.

Each "node" runs in its own network namespace joined to the other by a veth pair (10.x.y.1/24 and
10.x.y.2/24), so the rendezvous, gloo's connections and the pipeline's activations all cross a real
interface, as between two hosts. Where namespaces cannot be made (no ``ip`` from iproute2, no
CAP_SYS_ADMIN), both launches share the loopback interface instead; the test id says which mode ran.

    ip netns add A; ip netns add B; ip link add va type veth peer name vb; ...     # what the fixture does
    ip netns exec A env GLOO_SOCKET_IFNAME=va torchrun --nnodes 2 --nproc_per_node 2 --node_rank 0 \\
        --rdzv_backend c10d --rdzv_endpoint 10.x.y.1:29500 --local_addr 10.x.y.1 launch/pretrain.py ...
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launch" / "pretrain.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TIMEOUT = 480  # seconds per job (a 4-rank 6-step run takes ~40 s on 2 loaded cores)
CORPUS_BYTES = 200_000
STEPS = 6

pytestmark = pytest.mark.slow


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=False, capture_output=True, text=True)


def _ip_ok(*args: str) -> None:
    proc = _ip(*args)
    assert proc.returncode == 0, f"ip {shlex.join(args)}: {proc.stderr.strip()}"


def _netns_usable() -> bool:
    """Whether this machine lets us make network namespaces (root with iproute2 and CAP_SYS_ADMIN)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        return False
    probe = f"hcprobe-{uuid.uuid4().hex[:8]}"
    if _ip("netns", "add", probe).returncode != 0:
        return False
    _ip("netns", "del", probe)
    return True


MODE = "netns" if _netns_usable() else "loopback"  # decided at collection, so the test id tells


@dataclass(frozen=True)
class Host:
    """Where one torchrun launch runs: a command prefix, its address and interface."""

    prefix: tuple[str, ...]  # ("ip", "netns", "exec", NAME) or () on the loopback
    addr: str
    ifname: str
    netns: str | None = None

    def interface_bytes(self) -> int:
        """Bytes received plus sent on this host's interface so far."""
        read = [*self.prefix, "cat", f"/sys/class/net/{self.ifname}/statistics/rx_bytes",
                f"/sys/class/net/{self.ifname}/statistics/tx_bytes"]
        counters = subprocess.run(read, check=True, capture_output=True, text=True).stdout
        return sum(int(x) for x in counters.split())


def _remove_netns(name: str) -> None:
    """Kill what still runs in a namespace this test made (a hung rank), then delete it and its veth."""
    for pid in _ip("netns", "pids", name).stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", name)


@pytest.fixture
def two_hosts() -> Iterator[list[Host]]:
    """Two network namespaces joined by a veth pair (unique names per run, always removed), or two
    launches on the loopback where namespaces are not available."""
    if MODE == "loopback":
        yield [Host((), "127.0.0.1", "lo"), Host((), "127.0.0.1", "lo")]
        return
    token = uuid.uuid4().hex[:6]
    names = [f"hc-{token}-n{i}" for i in range(2)]
    veths = [f"hc{token}v{i}" for i in range(2)]  # at most 15 characters
    subnet = f"10.{200 + int(token[:2], 16) % 50}.{int(token[2:4], 16)}"
    hosts = [Host(("ip", "netns", "exec", name), f"{subnet}.{i + 1}", veth, name)
             for i, (name, veth) in enumerate(zip(names, veths))]
    try:
        for name in names:
            _ip_ok("netns", "add", name)
        _ip_ok("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
        for host in hosts:
            _ip_ok("link", "set", host.ifname, "netns", host.netns)
            _ip_ok("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
            _ip_ok("-n", host.netns, "link", "set", "lo", "up")
            _ip_ok("-n", host.netns, "link", "set", host.ifname, "up")
        yield hosts
    finally:
        for name in names:
            _remove_netns(name)
        _ip("link", "del", veths[0])  # only if moving it into a namespace failed: deletes both ends
        leftover = _ip("netns", "list").stdout
        assert not any(name in leftover for name in names), leftover


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The built-in small model and a 512-piece tokenizer with a slice of the default corpus."""
    from hyperclone_dist.builtin import BUILTIN, random_state_dict
    from hyperclone_dist.checkpoint import small_pt
    from hyperclone_dist.data.prepare import prepare_dataset
    from hyperclone_dist.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("multinode_inputs")
    small_pt.save(root / "small.pt", BUILTIN, random_state_dict(BUILTIN, seed=0))
    tok = train_tokenizer(None, root / "tok", BUILTIN.vocab_size, default_corpus_bytes=CORPUS_BYTES).model
    prepare_dataset(None, tok, root / "stdlib", default_corpus_bytes=CORPUS_BYTES, progress=False)
    return {"small": root / "small.pt", "tok": tok, "ds": root / "stdlib"}


def job_flags(inputs: dict[str, Path], out: Path) -> list[str]:
    return [str(PRETRAIN), "--clone-from", str(inputs["small"]), "--width-factor", "2", "--method", "noisy",
            "--tp", "2", "--pp", "2", "--train-iters", str(STEPS), "--global-batch-size", "8",
            "--micro-batch-size", "2", "--seq-length", "64", "--lr", "1e-3", "--no-progress",
            "--data-path", str(inputs["ds"]), "--tokenizer-model", str(inputs["tok"]),
            "--data-cache-path", str(out / "cache"), "--save", str(out / "save")]


def _wait_all(procs: dict[str, subprocess.Popen], logs: Path) -> None:
    """Wait for every launch; on a timeout kill each launch's session (its ranks included) and fail."""
    deadline = time.monotonic() + TIMEOUT
    for proc in procs.values():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs.values():
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
                    other.wait()
            pytest.fail(f"hung for {TIMEOUT} s:\n{_tails(procs, logs)}")


def _tails(procs: dict[str, subprocess.Popen], logs: Path) -> str:
    return "\n".join(f"--- {name} (exit {proc.returncode}):\n{(logs / f'{name}.err').read_text()[-3000:]}"
                     for name, proc in procs.items())


def _launch(name: str, cmd: list[str], logs: Path, env: dict | None = None) -> subprocess.Popen:
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, env=env or ENV, stdout=out, stderr=err, start_new_session=True)


def _losses(metrics: Path) -> list[float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), metrics.read_text()
    return [r["train/loss"] for r in rows]


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def node_command(rank: int, host: Host, master: str, port: int, rdzv_id: str) -> list[str]:
    """torchrun for node ``rank`` of 2, run inside ``host``'s namespace; node 0 hosts the rendezvous store."""
    return [*host.prefix, str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "2", "--node_rank", str(rank),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master}:{port}", "--rdzv_id", rdzv_id,
            "--rdzv_conf", f"is_host={int(rank == 0)}", "--local_addr", host.addr]


@pytest.mark.parametrize("mode", [MODE])
def test_two_node_job_matches_single_node(inputs, two_hosts, tmp_path, mode):
    where = (f"namespaces {two_hosts[0].netns} and {two_hosts[1].netns} joined by a veth pair"
             if mode == "netns" else "both launches on 127.0.0.1 in this network namespace")
    print(f"multinode mode: {mode} ({where})")
    logs, single, multi = tmp_path / "logs", tmp_path / "single", tmp_path / "multi"
    logs.mkdir()

    reference = [str(TORCHRUN), "--standalone", "--nproc_per_node", "4", *job_flags(inputs, single),
                 "--metrics-file", str(single / "metrics.jsonl")]
    ref = {"single": _launch("single", reference, logs)}
    _wait_all(ref, logs)
    assert ref["single"].returncode == 0, _tails(ref, logs)

    master = two_hosts[0].addr
    port = 29500 if mode == "netns" else _free_port(master)  # a fresh namespace has every port free
    before = [host.interface_bytes() for host in two_hosts]
    nodes = {}
    for rank, host in enumerate(two_hosts):
        cmd = [*node_command(rank, host, master, port, tmp_path.name), *job_flags(inputs, multi),
               "--metrics-file", str(multi / f"node{rank}.jsonl")]
        nodes[f"node{rank}"] = _launch(f"node{rank}", cmd, logs, {**ENV, "GLOO_SOCKET_IFNAME": host.ifname})
    _wait_all(nodes, logs)
    assert all(p.returncode == 0 for p in nodes.values()), _tails(nodes, logs)
    moved = [after - b for after, b in zip([host.interface_bytes() for host in two_hosts], before)]

    # only the logging rank (last pipeline stage, first TP and DP rank) writes metrics: on one node
    written = [multi / f"node{r}.jsonl" for r in range(2) if (multi / f"node{r}.jsonl").exists()]
    assert len(written) == 1, written
    expected, got = _losses(single / "metrics.jsonl"), _losses(written[0])
    print(f"two nodes vs one: losses bitwise equal {expected == got}; metrics from {written[0].stem}; "
          f"bytes through {two_hosts[0].ifname}, {two_hosts[1].ifname}: {moved}")
    for step, (a, b) in enumerate(zip(expected, got), start=1):
        assert abs(a - b) <= 1e-6 * abs(a), f"step {step}: single node {a!r}, two nodes {b!r}"
    assert (multi / "save" / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    if mode == "netns":  # the job really talked across the veth: pipeline activations alone are megabytes
        assert all(m > 1_000_000 for m in moved), moved
