"""`dllama-run`: generate text with a converted model on this machine.

    dllama-run --model m.m --tokenizer t.t --prompt "Once upon a time" --steps 64
    dllama-run chat --model m.m --tokenizer t.t

Text streams to stdout; start-up notes and the timing summary go to stderr. Other subcommands
(serve, worker, plan) register themselves on `app` from their own packages.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer

from dllama.formats import FormatError, padded_vocabulary
from dllama.runtime.distributed.plan import ROOT_COMPUTE_HELP, WEIGHTS_HELP
from dllama.runtime.engine import DEFAULT_MAX_SEQ_LEN, Engine, EngineError, release_freed_heap
from dllama.runtime.generate import reusable_prefix

app = typer.Typer(add_completion=False, rich_markup_mode=None,
                  help="Run a converted model: text generation (default), chat, and the serve/worker/plan subcommands.")

MODEL_HELP = "the .m model file (from dllama-convert)"
TOKENIZER_HELP = "the .t tokenizer file (from dllama-convert)"
SEQ_HELP = (f"KV cache positions, prompt and answer together (default {DEFAULT_MAX_SEQ_LEN}; models declare up to "
            "131072, far more than a small board holds; capped at the model's own limit)")
THREADS_HELP = "compute threads (default: all cores)"
WORKERS_HELP = ("run as the root of a cluster: the workers' host:port list, e.g. pi1:9999,pi2:9999 (each started with "
                "`dllama-run worker`); nodes = 1 + workers, any count up to the model's heads (dllama-run plan)")
BUFFER_HELP = ("how nodes exchange activations: q80 (default for q40/q80 models on a cluster) or f32 (default for f32 "
               "models, and on one node, where nothing crosses a network; q80 there rounds like the reference)")


@dataclass(frozen=True)
class ClusterOptions:
    """How the root of --workers splits the model (None workers: one node)."""

    workers: Optional[str] = None
    buffer_float_type: Optional[str] = None
    weights: Optional[str] = None
    root_compute: str = "all"


class CliError(Exception):
    """Bad input found at the CLI edge; printed as one line, exit code 1."""


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Session:
    engine: Engine
    tokenizer: object


def load_session(model: Path, tokenizer: Path, max_seq_len: int, nthreads: Optional[int],
                 cluster: ClusterOptions = ClusterOptions()) -> Session:
    """Engine + tokenizer, checked against each other; raises CliError/FormatError/EngineError."""
    mpi_engine = None
    if cluster.workers == "@mpi":  # distributed.mpi.MPI_WORKERS (dllama-run mpi): ranks > 0 serve in here and exit
        from dllama.runtime.distributed.mpi import open_mpi_engine

        mpi_engine = open_mpi_engine(model, max_seq_len, nthreads, cluster.buffer_float_type, cluster.weights,
                                     cluster.root_compute)
    for path, what, ext in ((model, "model", "m"), (tokenizer, "tokenizer", "t")):
        if not Path(path).is_file():
            raise CliError(f"{what} file {path} does not exist: pass the converted .{ext} file")
    from dllama.tokenizer import Tokenizer

    tok = Tokenizer.load(str(tokenizer))
    if mpi_engine is not None:
        engine = mpi_engine
    elif cluster.workers:  # issue 6: the same Engine interface, node 0 of a cluster
        from dllama.runtime.distributed.root import DistributedEngine, parse_workers

        engine = DistributedEngine(model, parse_workers(cluster.workers), max_seq_len=max_seq_len, nthreads=nthreads,
                                   buffer_type=cluster.buffer_float_type, weights=cluster.weights,
                                   root_compute=cluster.root_compute)
    elif cluster.weights is not None or cluster.root_compute != "all":
        raise CliError("--weights and --root-compute split the model over a cluster: add --workers host:port,...")
    else:
        engine = Engine.load(model, max_seq_len=max_seq_len, nthreads=nthreads, buffer_float_type=cluster.buffer_float_type)
    check_vocab(tok.vocab_size, engine.vocab_size, tokenizer, model)
    release_freed_heap()
    return Session(engine, tok)


def check_vocab(tokenizer_vocab: int, model_vocab: int, tokenizer: Path, model: Path) -> None:
    if tokenizer_vocab != model_vocab and not padded_vocabulary(model_vocab, tokenizer_vocab):
        raise CliError(f"tokenizer {tokenizer} has {tokenizer_vocab} tokens but model {model} has a vocabulary of "
                       f"{model_vocab}: pass the .t converted from the same checkpoint as the .m")


@dataclass
class Timing:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0   # until the first generated token: the batched prefill
    generated_tokens: int = 0
    decode_steps: int = 0         # tokens after the first, each one forward pass
    decode_seconds: float = 0.0

    def summary(self) -> str:
        p_rate = self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0
        g_rate = self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0
        ms = 1000 * self.decode_seconds / self.decode_steps if self.decode_steps else 0.0
        return (f"prompt: {self.prompt_tokens} tokens, {p_rate:.2f} tokens/s | generated: {self.generated_tokens} "
                f"tokens, {g_rate:.2f} tokens/s, {ms:.1f} ms/token")


def timed_tokens(tokens: Iterator[int], prompt_tokens: int, timing: Timing) -> Iterator[int]:
    """Pass tokens through, charging the wait for the first one to the prompt (prefill)."""
    start = time.perf_counter()
    last = start
    for i, token in enumerate(tokens):
        now = time.perf_counter()
        if i == 0:
            timing.prompt_tokens += prompt_tokens
            timing.prompt_seconds += now - start
        else:
            timing.decode_steps += 1
            timing.decode_seconds += now - last
        timing.generated_tokens += 1
        last = now
        yield token


def stream_text(session: Session, prompt_ids: list[int], steps: int, temperature: float, topp: float,
                seed: Optional[int], write: Callable[[str], None], timing: Timing, start_pos: int = 0) -> list[int]:
    from dllama.runtime.generate import generate

    tok = session.tokenizer
    decoder = tok.stream_decoder()
    out: list[int] = []
    tokens = generate(session.engine, prompt_ids, steps, temperature=temperature, top_p=topp, seed=seed,
                      eos_ids=tok.eos_ids, start_pos=start_pos)
    for token in timed_tokens(tokens, len(prompt_ids) - start_pos, timing):
        out.append(token)
        write(decoder.push(token))
    write(decoder.flush())
    return out


def _run_safely(body: Callable[[], None]) -> None:
    from dllama.runtime.distributed.protocol import ProtocolError
    from dllama.runtime.distributed.root import WorkerError

    try:
        body()
    except (CliError, FormatError, EngineError, ValueError, WorkerError, ProtocolError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _note("\ninterrupted")
        raise typer.Exit(130)


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.callback(invoke_without_command=True)
def main_command(
    ctx: typer.Context,
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    tokenizer: Optional[Path] = typer.Option(None, help=TOKENIZER_HELP),
    prompt: Optional[str] = typer.Option(None, help="text to continue"),
    steps: int = typer.Option(64, min=1, help="most tokens to generate"),
    temperature: float = typer.Option(0.8, min=0.0, help="sampling temperature; 0 is greedy"),
    topp: float = typer.Option(0.9, min=0.0, max=1.0, help="nucleus sampling: keep the most likely tokens up to this mass"),
    seed: Optional[int] = typer.Option(None, help="random seed for sampling (default: from the OS)"),
    max_seq_len: int = typer.Option(DEFAULT_MAX_SEQ_LEN, min=1, help=SEQ_HELP),
    nthreads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    workers: Optional[str] = typer.Option(None, help=WORKERS_HELP),
    buffer_float_type: Optional[str] = typer.Option(None, help=BUFFER_HELP),
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP),
    root_compute: str = typer.Option("all", help=ROOT_COMPUTE_HELP),
) -> None:
    """Generate text from a prompt on this machine (or as the root of --workers).

    Example: dllama-run --model tinyllama_q40.m --tokenizer tinyllama.t --prompt "Hello" --steps 32 --temperature 0
    """
    if ctx.invoked_subcommand is not None:
        return
    if model is None or tokenizer is None or prompt is None:
        _fail("--model, --tokenizer and --prompt are required (or use a subcommand: dllama-run --help)")

    def body() -> None:
        session = load_session(model, tokenizer, max_seq_len, nthreads,
                               ClusterOptions(workers, buffer_float_type, weights, root_compute))
        _note(f"max_seq_len {session.engine.max_seq_len} (--max-seq-len), {session.engine.nthreads} threads")
        ids = session.tokenizer.encode(prompt)
        if len(ids) >= session.engine.max_seq_len:
            raise CliError(f"the prompt has {len(ids)} tokens but --max-seq-len is {session.engine.max_seq_len}: "
                           "raise --max-seq-len or shorten the prompt")
        timing = Timing()
        _stdout(prompt)
        stream_text(session, ids, steps, temperature, topp, seed, _stdout, timing)
        _stdout("\n")
        _note(timing.summary())

    _run_safely(body)


@app.command("chat")
def chat_command(
    model: Path = typer.Option(..., help=MODEL_HELP),
    tokenizer: Path = typer.Option(..., help=TOKENIZER_HELP),
    system: Optional[str] = typer.Option(None, help="system prompt"),
    steps: int = typer.Option(512, min=1, help="most tokens per answer"),
    temperature: float = typer.Option(0.8, min=0.0, help="sampling temperature; 0 is greedy"),
    topp: float = typer.Option(0.9, min=0.0, max=1.0, help="nucleus sampling mass"),
    seed: Optional[int] = typer.Option(None, help="random seed for sampling"),
    max_seq_len: int = typer.Option(DEFAULT_MAX_SEQ_LEN, min=1, help=SEQ_HELP),
    nthreads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    workers: Optional[str] = typer.Option(None, help=WORKERS_HELP),
    buffer_float_type: Optional[str] = typer.Option(None, help=BUFFER_HELP),
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP),
    root_compute: str = typer.Option("all", help=ROOT_COMPUTE_HELP),
) -> None:
    """Chat interactively with the model's chat template; the KV cache carries the conversation.

    Example: dllama-run chat --model qwen3_q40.m --tokenizer qwen3.t --temperature 0.7
    """
    def body() -> None:
        session = load_session(model, tokenizer, max_seq_len, nthreads,
                               ClusterOptions(workers, buffer_float_type, weights, root_compute))
        _note(f"max_seq_len {session.engine.max_seq_len} (--max-seq-len); empty line or Ctrl-D ends the chat")
        messages = [{"role": "system", "content": system}] if system else []
        cached: list[int] = []
        while True:
            try:
                user = input("> ")
            except EOFError:
                break
            if not user.strip():
                break
            messages.append({"role": "user", "content": user})
            ids = session.tokenizer.encode_chat(messages)
            start = min(reusable_prefix(cached, ids), session.engine.pos)
            if len(ids) >= session.engine.max_seq_len:
                raise CliError(f"the conversation has {len(ids)} tokens, more than --max-seq-len "
                               f"{session.engine.max_seq_len}: start a new chat or raise --max-seq-len")
            timing = Timing()
            answer = stream_text(session, ids, steps, temperature, topp, seed, _stdout, timing, start_pos=start)
            _stdout("\n")
            _note(timing.summary())
            messages.append({"role": "assistant", "content": session.tokenizer.decode(answer)})
            cached = ids + answer

    _run_safely(body)



def _register_subcommands() -> None:
    # serve (issue 7) and worker/plan (issue 6) live in their own packages
    for module in ("dllama.runtime.serve.cli", "dllama.runtime.distributed.cli", "dllama.runtime.distributed.mpi_cli"):
        try:
            register = __import__(module, fromlist=["register"]).register
        except (ImportError, AttributeError):
            continue
        register(app)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
