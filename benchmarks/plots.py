"""The figure at the top of docs/BENCHMARKS.md, drawn from the numbers recorded in docs/BENCHMARKS-HISTORY.md.

    pip install ".[plots]" && python benchmarks/plots.py          # writes docs/benchmarks-summary.png

Nothing is measured here: each table below copies one recorded session (its section, date and
command in the comment above it), so the figure changes only when a new session is recorded.
All sessions ran on the 2-core development box (x86_64 AMD EPYC, AVX512-VNNI, Linux 6.18,
Python 3.11.7), shared with other jobs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks-summary.png"

# "The forward pass in compiled code", fourth pass: `flock /tmp/dllama-bench.lock python
# benchmarks/vs_reference.py --pairs 5 --threads 1,2`, 2026-12-03, the nine sessions 08:25-10:01 UTC;
# medians of per-pair ratios ours / reference, q40 weights. Targets: decode 1.3, prefill 1.5.
VS_REFERENCE = {  # series -> (decode ratios, prefill ratios), one per session
    "SmolLM2-135M, 1 thread": ([1.56, 1.89, 1.81, 1.58, 1.70, 1.73, 1.66, 1.60, 1.53],
                               [1.91, 1.94, 2.30, 2.09, 1.92, 1.92, 1.96, 2.03, 2.01]),
    "SmolLM2-135M, 2 threads": ([1.35, 1.59, 1.84, 1.43, 1.59, 1.58, 1.70, 1.63, 1.42],
                                [1.66, 1.91, 2.08, 1.73, 1.83, 1.93, 1.86, 1.98, 2.00]),
    "TinyLlama-1.1B shape, 1 thread": ([2.20, 2.18, 2.15, 2.18, 2.11, 2.11, 2.18, 2.23, 2.15],
                                       [1.81, 1.80, 1.66, 1.66, 1.81, 1.74, 1.69, 1.76, 1.68]),
    "TinyLlama-1.1B shape, 2 threads": ([2.07, 2.16, 2.03, 2.16, 2.19, 2.19, 2.34, 2.13, 2.18],
                                        [2.10, 2.25, 1.88, 1.63, 1.64, 1.69, 1.66, 1.69, 1.60]),
}
DECODE_TARGET, PREFILL_TARGET = 1.3, 1.5

# "Any cluster shape": `flock /tmp/dllama-bench.lock python benchmarks/distributed.py --nodes
# 1,2,3,4,8,3w,3c --steps 24 --repeat 1`, 2026-12-02 15:26 UTC; TinyLlama-1.1B-shaped q40 (844 MB),
# every node a 1-thread process on loopback. Peak RSS of the root and of one worker (MiB), what
# `dllama-run plan` predicted, and what the root sends and receives per token (kB).
CLUSTER_NODES = [1, 2, 3, 4, 8]
CLUSTER_ROOT_MIB = [597, 329, 237, 187, 119]
CLUSTER_WORKER_MIB = [None, 325, 236, 186, 118]
CLUSTER_PLAN_ROOT_MIB = [601, 326, 237, 187, 119]
CLUSTER_SENT_KB = [0, 104.5, 401.5, 891.1, 2584.0]
CLUSTER_RECEIVED_KB = [0, 128.3, 235.2, 336.8, 730.0]

# "MPI and the network of a Pi cluster": `flock /tmp/dllama-bench.lock python benchmarks/distributed.py
# --netem --nodes 2,4,8 --profiles pi5 --steps 8`, 2026-12-02 17:30 UTC: transfer ms per token over links
# like a Pi 5's (0.2 ms, 1 Gbit/s), from measured bytes and per-step costs with the delay counted per
# step (this machine's kernel has no netem).
NETWORK_NODES = [2, 4, 8]
NETWORK_TCP_MS = [20.5, 26.7, 40.4]
NETWORK_MPI_MS = [11.4, 13.2, 16.7]

# "Conversion", SmolLM2-135M-Instruct to q40, paired with the reference converter, 2026-12-02 16:28 UTC
# (two runs each: seconds, peak MB).
CONVERSION = {
    "reference\nconverter": ([11.85, 11.68], [1444, 1445]),
    "dllama-convert\ngguf": ([2.11, 1.84], [263, 264]),
    "dllama-convert\nhf": ([1.32, 1.13], [204, 204]),
}


def _vs_reference(ax) -> None:
    for i, (name, (decode, prefill)) in enumerate(VS_REFERENCE.items()):
        ax.scatter([i - 0.12] * len(decode), decode, s=14, color="tab:blue", label="decode" if i == 0 else None)
        ax.scatter([i + 0.12] * len(prefill), prefill, s=14, color="tab:orange", label="prefill" if i == 0 else None)
    ax.axhline(DECODE_TARGET, color="tab:blue", linestyle=":", linewidth=1, label=f"decode target {DECODE_TARGET}")
    ax.axhline(PREFILL_TARGET, color="tab:orange", linestyle=":", linewidth=1, label=f"prefill target {PREFILL_TARGET}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(VS_REFERENCE)), [n.replace(", ", "\n") for n in VS_REFERENCE], fontsize=8)
    ax.set_ylim(0.8, 2.5)
    ax.set_ylabel("ours / reference C++ runtime (tokens/s)")
    ax.set_title("Speed against the reference runtime, q40\n9 paired sessions, 2026-12-03", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")


def _cluster_memory(ax) -> None:
    x = range(len(CLUSTER_NODES))
    ax.bar([i - 0.2 for i in x], CLUSTER_ROOT_MIB, width=0.4, label="root")
    workers = [w or 0 for w in CLUSTER_WORKER_MIB]
    ax.bar([i + 0.2 for i in x], workers, width=0.4, label="each worker")
    ax.scatter([i - 0.2 for i in x], CLUSTER_PLAN_ROOT_MIB, marker="_", s=300, color="black", zorder=3,
               label="dllama-run plan (root)")
    ax.set_xticks(list(x), [str(n) for n in CLUSTER_NODES])
    ax.set_xlabel("nodes")
    ax.set_ylabel("peak RSS per node (MiB)")
    ax.set_title("Memory per node, TinyLlama-1.1B-shaped q40\n2026-12-02", fontsize=10)
    ax.legend(fontsize=7)


def _traffic(ax) -> None:
    ax.plot(CLUSTER_NODES[1:], CLUSTER_SENT_KB[1:], marker="o", label="root sends (TCP, kB/token)")
    ax.plot(CLUSTER_NODES[1:], CLUSTER_RECEIVED_KB[1:], marker="o", label="root receives (TCP, kB/token)")
    ax.set_xlabel("nodes")
    ax.set_ylabel("kB per token")
    ax.set_xticks(CLUSTER_NODES[1:])
    twin = ax.twinx()
    twin.plot(NETWORK_NODES, NETWORK_TCP_MS, marker="s", linestyle="--", color="tab:red",
              label="TCP star, Pi 5 links (ms/token)")
    twin.plot(NETWORK_NODES, NETWORK_MPI_MS, marker="s", linestyle="--", color="tab:green",
              label="MPI direct, Pi 5 links (ms/token)")
    twin.set_ylabel("modelled transfer ms per token")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
    ax.set_title("Network per token, TinyLlama-1.1B-shaped q40\n2026-12-02", fontsize=10)


def _conversion(ax) -> None:
    names = list(CONVERSION)
    seconds = [min(s) for s, _ in CONVERSION.values()]
    memory = [max(m) for _, m in CONVERSION.values()]
    ax.bar(range(len(names)), seconds, color="tab:purple")
    for i, (s, m) in enumerate(zip(seconds, memory)):
        ax.annotate(f"{s:.1f} s\n{m} MB", (i, s), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(0, max(seconds) * 1.35)
    ax.set_ylabel("seconds (best of 2), label: peak memory")
    ax.set_title("Converting SmolLM2-135M to q40\n2026-12-02", fontsize=10)


def draw(out: Path = OUT) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), dpi=100)
    _vs_reference(axes[0][0])
    _cluster_memory(axes[0][1])
    _traffic(axes[1][0])
    _conversion(axes[1][1])
    fig.suptitle("dllama on a 2-core x86_64 box (AMD EPYC, shared); details in docs/BENCHMARKS-HISTORY.md",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out, metadata={"Software": None})  # no version stamp: the file changes only with the data
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"the PNG to write (default {OUT.relative_to(ROOT)})")
    args = parser.parse_args()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit('error: matplotlib is not installed: pip install ".[plots]"') from None
    print(draw(args.out))


if __name__ == "__main__":
    main()
