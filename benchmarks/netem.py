"""The network of a Pi cluster on one Linux machine: network namespaces joined by a bridge, with
`tc netem` delay and rate on every link. Needs root and iproute2 (`ip`, `tc`).

    with NetemCluster(4, PROFILES["pi5"]) as net:   # namespaces dlnet0..3 (10.77.0.1-4), hub dlnethub
        proc = net.popen(0, ["python", "-c", "..."])
        net.tx_bytes()                              # bytes every node has sent so far (its eth0)

Each node is a namespace with one veth (eth0, 10.77.0.<i+1>/24) whose other end sits on a bridge in
a hub namespace: a switch with one port per board. Every node's egress gets the profile's one-way
delay and its link rate (netem), and the hub's port towards each node the link rate again (the
switch's port is as fast as the board's), so a root that receives from 7 boards at once is limited
by its own link as on real Ethernet. Only the namespaces and links named here are created, and
they are removed again on exit, also when the body fails (`python benchmarks/netem.py --clean`
removes what a killed run left).

Where the kernel has no netem (CONFIG_NET_SCH_NETEM unset, as on the Firecracker VM of the
development box), the rate is applied with `tbf` instead and the delay is not emulated:
`NetemCluster.emulates_delay` says so, and the benchmark adds delay x the network steps it
counts (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass

PREFIX = "dlnet"
SUBNET = "10.77.0"


@dataclass(frozen=True)
class Profile:
    name: str
    delay_ms: float   # one way, per link
    rate_mbit: int

    def describe(self) -> str:
        return f"{self.name}: {self.delay_ms:g} ms one way, {self.rate_mbit} Mbit/s"


PROFILES = {
    "pi5": Profile("Pi 5 Ethernet", 0.2, 1000),
    "pi3": Profile("Pi 3B+ Ethernet (USB 2 bound)", 0.5, 100),
    "none": Profile("no shaping (veth)", 0.0, 0),
}


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out


def kernel_has_netem() -> bool:
    probe = f"{PREFIX}probe"
    sh("ip", "netns", "add", probe)
    try:
        added = sh("tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False)
        return added.returncode == 0
    finally:
        sh("ip", "netns", "del", probe, check=False)


class NetemCluster:
    def __init__(self, n: int, profile: Profile):
        self.n, self.profile = n, profile
        self.hub = f"{PREFIX}hub"
        self.emulates_delay = False

    def ns(self, i: int) -> str:
        return f"{PREFIX}{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def __enter__(self) -> "NetemCluster":
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _create(self) -> None:
        netem = kernel_has_netem()
        self.emulates_delay = netem and self.profile.delay_ms > 0
        sh("ip", "netns", "add", self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i in range(self.n):
            ns, node_end, hub_end = self.ns(i), f"{PREFIX}{i}a", f"{PREFIX}{i}b"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", node_end, "type", "veth", "peer", "name", hub_end)
            sh("ip", "link", "set", node_end, "netns", ns)
            sh("ip", "link", "set", hub_end, "netns", self.hub)
            sh("ip", "-n", ns, "link", "set", node_end, "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", self.hub, "link", "set", hub_end, "master", "br0")
            sh("ip", "-n", self.hub, "link", "set", hub_end, "up")
            if self.profile.rate_mbit:
                self._shape(ns, "eth0", netem, delay=True)
                self._shape(self.hub, hub_end, netem, delay=False)

    def _shape(self, ns: str, dev: str, netem: bool, delay: bool) -> None:
        rate = f"{self.profile.rate_mbit}mbit"
        if netem:
            extra = ["delay", f"{self.profile.delay_ms}ms"] if delay and self.profile.delay_ms else []
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", *extra, "rate", rate, "limit", "100000")
            return
        # a bucket of ~100 us of the link (at least two frames): bursts leave at the link rate, not veth's
        burst = max(2 * 1514, self.profile.rate_mbit * 1_000_000 // 8 // 10_000)
        sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", str(burst),
           "latency", "100ms")

    def remove(self) -> None:
        for i in range(self.n):
            sh("ip", "netns", "del", self.ns(i), check=False)  # takes its veth, and the hub's end, with it
        sh("ip", "netns", "del", self.hub, check=False)

    def command(self, i: int, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(i), *cmd]

    def popen(self, i: int, cmd: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(i, cmd), **kw)

    def link_bytes(self) -> list[tuple[int, int]]:
        """(sent, received) bytes of every node's link so far (IP headers included): the kernel's counters."""
        out = []
        for i in range(self.n):
            stats = json.loads(sh("ip", "-n", self.ns(i), "-j", "-s", "link", "show", "dev", "eth0").stdout)
            out.append((stats[0]["stats64"]["tx"]["bytes"], stats[0]["stats64"]["rx"]["bytes"]))
        return out


def mpiexec_command(net: NetemCluster, launcher_dir) -> list[str]:
    """mpiexec in node 0's namespace starting one rank per node: hydra's ssh launcher is replaced by a
    script that enters the namespace of the node with that address, and MPICH is kept on TCP over
    eth0 (all namespaces share one kernel: left alone it finds the others "local" and uses memory)."""
    from pathlib import Path

    script = Path(launcher_dir) / "netns-launch"
    script.write_text("#!/bin/sh\n# hydra's ssh: the proxy runs in the namespace of the node with this address\n"
                      "while [ \"${1#-}\" != \"$1\" ]; do shift; done\n"
                      f"host=$1; shift\nexec ip netns exec {PREFIX}$(( ${{host##*.}} - 1 )) sh -c \"$*\"\n")
    script.chmod(0o755)
    hosts = ",".join(net.address(i) for i in range(net.n))
    return ["mpiexec", "-iface", "eth0", "-launcher", "ssh", "-launcher-exec", str(script), "-hosts", hosts,
            "-n", str(net.n)]


MPI_OVER_ETH0 = {"MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": "eth0"}


def clean_leftovers() -> list[str]:
    """Remove namespaces a killed run left behind (only ours: the dlnet prefix)."""
    names = [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.startswith(PREFIX)]
    for name in names:
        sh("ip", "netns", "del", name, check=False)
    return names


ECHO = """
import socket, sys
srv = socket.create_server(("0.0.0.0", 7777)); print("up", flush=True)
c, _ = srv.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while (b := c.recv(65536)):
    c.sendall(b)
"""
PING = """
import socket, statistics, sys, time
s = socket.create_connection((sys.argv[1], 7777)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
n = int(sys.argv[2])
for _ in range(200):
    t = time.perf_counter(); s.sendall(b"x" * n); got = 0
    while got < n:
        got += len(s.recv(n - got))
    times.append(time.perf_counter() - t)
print(statistics.median(times) * 1e6)
"""


MPI_PING = """
import os, sys, time
import numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD
buf, other, times = np.zeros(int(sys.argv[1]), np.uint8), 1 - c.rank, []
for _ in range(300):
    t = time.perf_counter()
    requests = [c.Isend(buf, other), c.Irecv(buf, other)]
    while not MPI.Request.Testall(requests):
        os.sched_yield()  # as dllama's MPI exchange waits
    times.append(time.perf_counter() - t)
if c.rank == 0:
    print(sorted(times)[len(times) // 2] * 1e6)
"""


def mpi_step_us(net: NetemCluster, nbytes: int = 2176, launcher_dir: str = "/tmp") -> float:
    """Median time of one exchange step between nodes 0 and 1 under mpiexec (both send nbytes, both
    receive them: one network latency plus the stack's cost), in microseconds."""
    import os

    out = subprocess.run(net.command(0, mpiexec_command(net, launcher_dir)[:-1] + ["2", sys.executable, "-c",
                                                                                   MPI_PING, str(nbytes)]),
                         capture_output=True, text=True, env=dict(os.environ, **MPI_OVER_ETH0), check=True)
    return float(out.stdout.split()[-1])


def ping_pong_us(net: NetemCluster, a: int = 0, b: int = 1, nbytes: int = 2176) -> float:
    """Median round trip of nbytes over TCP from node a to node b and back, in microseconds."""
    server = net.popen(b, [sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()
        out = subprocess.run(net.command(a, [sys.executable, "-c", PING, net.address(b), str(nbytes)]),
                             capture_output=True, text=True, check=True)
        return float(out.stdout)
    finally:
        server.kill()
        server.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clean", action="store_true", help="remove namespaces left by a killed run")
    p.add_argument("--check", type=int, metavar="N", help="build N nodes per profile, time a TCP ping-pong, remove")
    args = p.parse_args()
    if args.clean:
        print("removed:", ", ".join(clean_leftovers()) or "nothing")
    if args.check:
        for key, profile in PROFILES.items():
            with NetemCluster(args.check, profile) as net:
                print(f"{profile.describe()}: {args.check} nodes, delay emulated: {net.emulates_delay}, "
                      f"2.2 kB TCP round trip {ping_pong_us(net):.0f} us")


if __name__ == "__main__":
    main()
