"""`dllama-run mpi [chat | serve] OPTIONS`: any dllama-run command on a cluster started by mpiexec.

    mpiexec -n 4 -hosts pi1,pi2,pi3,pi4 dllama-run mpi --model /srv/m.m --tokenizer /srv/t.t --prompt Hi
    mpiexec -n 4 -f hosts dllama-run mpi serve --model /srv/m.m --tokenizer /srv/t.t --host 0.0.0.0

The options are generate's (the default), chat's or serve's, unchanged: this command runs the same
command line with the cluster taken from MPI (runtime/distributed/mpi.py), so every option means
what it means there. Rank 0 is the root; the other ranks only read --model, --max-seq-len,
--threads, --buffer-float-type, --weights and --root-compute, and serve rank 0 until it stops.
"""
from __future__ import annotations

import typer

from dllama.cli.edge import fail

CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}  # the rest is generate's, chat's or serve's


def mpi_command(ctx: typer.Context) -> None:
    """Run generate (default), chat or serve under mpiexec: rank 0 is the root, every rank a node.

    The options are those of `dllama-run --help`, `dllama-run chat --help` or `dllama-run serve --help`
    (without --workers), plus --stream-weights: rank 0 sends every rank its slices, so only rank 0
    needs the .m, and --progress-timeout SECONDS (default 30): a rank that answers nothing that long
    inside a forward is named and the job ends. Otherwise every board needs the same .m at the same
    path. pip install "dllama[mpi]".
    Example: mpiexec -n 4 -hosts pi1,pi2,pi3,pi4 dllama-run mpi --model /srv/m.m --tokenizer /srv/t.t --prompt Hi
    """
    from dllama.cli.dllama_run import app
    from dllama.runtime.distributed import mpi  # only now: every dllama-run start registers this command

    args = list(ctx.args)
    if "--workers" in args:
        fail("dllama-run mpi takes its nodes from mpiexec (-n, -hosts, -f): drop --workers")
    if "--stream-weights" in args:
        args.remove("--stream-weights")
        mpi.STREAM_WEIGHTS = True
    if (timeout := _take_value(args, "--progress-timeout")) is not None:
        try:
            mpi.PROGRESS_TIMEOUT_S = float(timeout)
        except ValueError:
            fail(f"--progress-timeout {timeout!r}: give seconds, e.g. 30")
        if not mpi.PROGRESS_TIMEOUT_S > 0:
            fail("--progress-timeout must be positive seconds")
    typer.main.get_command(app).main(args + ["--workers", mpi.MPI_WORKERS], prog_name="dllama-run mpi")


def _take_value(args: list[str], name: str) -> str | None:
    """Remove `name VALUE` or `name=VALUE` from args and return VALUE (None if absent)."""
    for i, arg in enumerate(args):
        if arg == name:
            if i + 1 >= len(args):
                fail(f"{name} needs a value")
            value = args[i + 1]
            del args[i:i + 2]
            return value
        if arg.startswith(name + "="):
            del args[i]
            return arg.split("=", 1)[1]
    return None
