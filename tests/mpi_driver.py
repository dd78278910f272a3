"""Run under mpiexec by tests/test_mpi.py: rank 0 evaluates a prompt and greedy tokens on the MPI cluster
and saves its logits; the other ranks serve it (distributed.mpi.open_mpi_engine never returns there).

    mpiexec -n 3 python tests/mpi_driver.py MODEL OUT.npz --ids 1,17,42 --steps 4 [--buffer-float-type f32]
    mpiexec -n 2 python tests/mpi_driver.py MODEL OUT.npz --slots 4 ...   # each prompt alone, then all in steps
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from dllama.runtime.distributed import mpi
from dllama.runtime.distributed.mpi import MpiError, open_mpi_engine


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--ids", default="1,17,42,99,3,250,7")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--buffer-float-type", default=None)
    p.add_argument("--weights", default=None)
    p.add_argument("--root-compute", default="all")
    p.add_argument("--stream-weights", action="store_true", help="rank 0 sends the other ranks their slices")
    p.add_argument("--until-killed", choices=["busy", "idle"], default=None,
                   help="after loading, print each rank's pid and host, then decode forever (busy) or wait (idle)")
    p.add_argument("--progress-timeout", type=float, default=None, help="as dllama-run mpi --progress-timeout")
    p.add_argument("--slots", type=int, default=1, help="KV cache slots: greedy answers alone, then generate_many")
    args = p.parse_args()
    if args.progress_timeout is not None:
        mpi.PROGRESS_TIMEOUT_S = args.progress_timeout
    try:
        engine = open_mpi_engine(args.model, 64, 1, args.buffer_float_type, args.weights, args.root_compute,
                                 log=lambda msg: None, stream=args.stream_weights, slots=args.slots)
    except (MpiError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    ids = [int(t) for t in args.ids.split(",")]
    if args.slots > 1:
        return save_alone_and_beside(engine, args.out)
    if args.until_killed:
        try:
            run_until_killed(engine, ids, args.until_killed == "busy")
        except MpiError as e:  # as dllama-run's edge: one line
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
    logits = [engine.forward(ids, 0)]
    tokens = [int(np.argmax(logits[-1][-1]))]
    for i in range(args.steps - 1):
        logits.append(engine.forward([tokens[-1]], len(ids) + i))
        tokens.append(int(np.argmax(logits[-1][-1])))
    np.savez(args.out, logits=np.concatenate(logits), tokens=np.array(tokens), sent=engine.traffic.sent,
             collectives=engine.exchange.collectives)
    engine.close()


SLOT_PROMPTS = [[1, 17, 42, 99, 3], [250, 7], [5] * 40, [9], [11, 12, 13, 14, 15, 16, 17], [200, 100]]
SLOT_LIMITS = [6, 9, 3, 8, 5, 7]


def save_alone_and_beside(engine, out: Path) -> None:
    """Each prompt's greedy answer alone (slot 0), then all of them through the slots at once (generate_many)."""
    from dllama.runtime.batching import generate_many
    from dllama.runtime.generate import generate

    alone = []
    for prompt, limit in zip(SLOT_PROMPTS, SLOT_LIMITS):
        engine.reset()
        alone.append(list(generate(engine, prompt, limit)))
    engine.reset()
    sizes, step = [], engine.step
    engine.step = lambda runs: (sizes.append(len(runs)), step(runs))[1]  # sequences per step
    beside = generate_many(engine, SLOT_PROMPTS, SLOT_LIMITS)
    np.savez(out, alone=np.array(sum(alone, [])), beside=np.array(sum(beside, [])),
             lengths=np.array([len(a) for a in alone] + [len(b) for b in beside]), most=max(sizes))
    engine.close()


def run_until_killed(engine, ids: list[int], busy: bool) -> None:
    for s in engine.statuses:
        print(f"rank {s.rank} pid {s.pid} host {s.host}", flush=True)
    while True:
        if busy:
            engine.forward(ids, 0)
        else:
            time.sleep(1)


if __name__ == "__main__":
    main()
