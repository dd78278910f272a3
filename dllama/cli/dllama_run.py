"""`dllama-run`: generate text with a model on this machine (or as a cluster's root).

    dllama-run HuggingFaceTB/SmolLM2-135M-Instruct --prompt "Once upon a time" --steps 64
    dllama-run --model m.m --tokenizer t.t --prompt "Once upon a time"
    dllama-run chat MODEL
    dllama-run serve / worker / plan / list / rm   (run_serve.py, run_cluster.py, run_store.py)

Text streams to stdout; start-up notes and the timing summary go to stderr.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dllama.cli import options, run_cluster, run_mpi, run_serve, run_store
from dllama.cli.command_group import ModelFirstGroup, new_app
from dllama.cli.edge import edge, fail, note, stop_quietly
from dllama.cli.loading import ClusterOptions, load_model, model_files
from dllama.cli.run_chat import run_chat
from dllama.cli.streaming import Timing, stream_text, write_stdout
from dllama.runtime.conversation import Conversation, answer_room
from dllama.runtime.sampler import Sampling

app = new_app(cls=ModelFirstGroup, subcommand_metavar="[MODEL] | COMMAND [ARGS]...", no_args_is_help=True,
              help="Run a model: text generation (default), chat, and the serve/worker/plan/list/rm commands. MODEL "
                   "is a stored model's name (dllama-run list), a hub id (org/name), a GGUF file, a checkpoint folder "
                   "or a .m file: a source is converted into the model store once (--quant), then run from there.")


@app.callback(invoke_without_command=True)
def generate_command(
    ctx: typer.Context,
    source: Optional[str] = options.RUN_SOURCE,
    model: Optional[Path] = options.MODEL,
    tokenizer: Optional[Path] = options.TOKENIZER,
    quant: Optional[str] = options.QUANT,
    prompt: Optional[str] = typer.Option(None, help="text to continue"),
    steps: int = typer.Option(64, min=1, help="most tokens to generate"),
    temperature: float = options.TEMPERATURE,
    topp: float = typer.Option(0.9, min=0.0, max=1.0,
                               help="nucleus sampling: keep the most likely tokens up to this mass"),
    seed: Optional[int] = options.SEED,
    top_k: int = options.TOP_K,
    min_p: float = options.MIN_P,
    repeat_penalty: Optional[float] = options.REPEAT_PENALTY,
    repeat_last_n: int = options.REPEAT_LAST_N,
    presence_penalty: float = options.PRESENCE_PENALTY,
    frequency_penalty: float = options.FREQUENCY_PENALTY,
    stop: Optional[List[str]] = options.STOP,
    max_seq_len: int = options.MAX_SEQ_LEN,
    nthreads: Optional[int] = options.NTHREADS,
    workers: Optional[str] = options.WORKERS,
    buffer_float_type: Optional[str] = options.BUFFER_FLOAT_TYPE,
    weights: Optional[str] = options.WEIGHTS,
    root_compute: str = options.ROOT_COMPUTE,
    version: bool = options.VERSION,
    cluster_key_file: Optional[Path] = options.CLUSTER_KEY_FILE,
    exchange: str = options.EXCHANGE,
    ignore_eos: bool = typer.Option(False, "--ignore-eos",
                                    help="generate all --steps tokens, past end-of-sequence (benchmarks)"),
) -> None:
    """Generate text from a prompt on this machine (or as the root of --workers).

    Example: dllama-run HuggingFaceTB/SmolLM2-135M-Instruct --prompt "Hello" --steps 32 --temperature 0
    """
    if ctx.invoked_subcommand is not None:
        return
    if prompt is None:
        fail("--prompt is required, with MODEL or --model (or use a command: dllama-run --help)")
    with edge(interrupted=stop_quietly):
        files = model_files(source, model, tokenizer, quant)
        loaded = load_model(files.model, files.tokenizer, max_seq_len, nthreads,
                            ClusterOptions(workers, buffer_float_type, weights, root_compute, cluster_key_file,
                                           exchange))
        note(f"max_seq_len {loaded.engine.max_seq_len} (--max-seq-len), {loaded.engine.nthreads} threads")
        ids = loaded.tokenizer.encode(prompt)
        answer_room(len(ids), loaded.engine.max_seq_len)
        timing = Timing()
        write_stdout(prompt)
        sampling = Sampling(temperature, topp, seed, top_k, min_p, repeat_penalty, repeat_last_n, presence_penalty,
                            frequency_penalty)
        stream_text(loaded, Conversation(loaded.engine.max_seq_len), ids, steps, sampling, write_stdout, timing,
                    stop or (), ignore_eos=ignore_eos)
        write_stdout("\n")
        note(timing.summary())


def chat_command(
    source: Optional[str] = options.SOURCE,
    model: Optional[Path] = options.MODEL,
    tokenizer: Optional[Path] = options.TOKENIZER,
    quant: Optional[str] = options.QUANT,
    system: Optional[str] = typer.Option(None, help="system prompt"),
    steps: int = typer.Option(512, min=1, help="most tokens per answer"),
    temperature: float = options.TEMPERATURE,
    topp: float = typer.Option(0.9, min=0.0, max=1.0, help="nucleus sampling mass"),
    seed: Optional[int] = options.SEED,
    top_k: int = options.TOP_K,
    min_p: float = options.MIN_P,
    repeat_penalty: Optional[float] = options.REPEAT_PENALTY,
    repeat_last_n: int = options.REPEAT_LAST_N,
    presence_penalty: float = options.PRESENCE_PENALTY,
    frequency_penalty: float = options.FREQUENCY_PENALTY,
    stop: Optional[List[str]] = options.STOP,
    max_seq_len: int = options.MAX_SEQ_LEN,
    nthreads: Optional[int] = options.NTHREADS,
    workers: Optional[str] = options.WORKERS,
    buffer_float_type: Optional[str] = options.BUFFER_FLOAT_TYPE,
    weights: Optional[str] = options.WEIGHTS,
    root_compute: str = options.ROOT_COMPUTE,
    cluster_key_file: Optional[Path] = options.CLUSTER_KEY_FILE,
    exchange: str = options.EXCHANGE,
) -> None:
    """Chat interactively with the model's chat template; the KV cache carries the conversation.

    At a terminal: the arrows edit and recall lines, Alt-Enter (or a line ending in \\) starts a new line,
    Ctrl-C stops an answer, Ctrl-D quits; /help lists /reset, /system and /save.

    Example: dllama-run chat HuggingFaceTB/SmolLM2-135M-Instruct --temperature 0.7
    """
    with edge(interrupted=stop_quietly):
        files = model_files(source, model, tokenizer, quant)
        loaded = load_model(files.model, files.tokenizer, max_seq_len, nthreads,
                            ClusterOptions(workers, buffer_float_type, weights, root_compute, cluster_key_file,
                                           exchange))
        run_chat(loaded, system, steps, Sampling(temperature, topp, seed, top_k, min_p, repeat_penalty, repeat_last_n,
                                                 presence_penalty, frequency_penalty), stop or ())


# every subcommand, one line each
app.command("chat")(chat_command)
app.command("serve")(run_serve.serve_command)
app.command("worker")(run_cluster.worker_command)
app.command("plan")(run_cluster.plan_command)
app.command("mpi", context_settings=run_mpi.CONTEXT)(run_mpi.mpi_command)
app.command("list")(run_store.list_command)
app.command("rm")(run_store.rm_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
