"""Options that several commands share."""
from __future__ import annotations

import typer

from dllama.cli.command_group import RUN_MODEL, VERSION  # noqa: F401 (VERSION: every app's callback)
from dllama.runtime.engine import DEFAULT_MAX_SEQ_LEN

SOURCE_HELP = ("a stored model's name (dllama-run list), a hub id (org/name), a GGUF file, a checkpoint folder, or a "
               ".m file (its .t beside it); a source is converted into the model store once, then run from there")
MODEL_HELP = "a converted .m file (or a stored model's name); unlike MODEL, never converts"
TOKENIZER_HELP = "the .t tokenizer file (default: the .t beside the .m, or the stored model's)"
QUANT_HELP = ("weight type when the model is converted from a source: q40, q80 or f32 (default: q80 for a model "
              "under 1.5B weights, q40 above, or the blocks of a Q4_0/Q8_0 GGUF)")
SEQ_HELP = (f"KV cache positions, prompt and answer together (default {DEFAULT_MAX_SEQ_LEN}; models declare up to "
            "131072, far more than a small board holds; capped at the model's own limit)")
THREADS_HELP = "compute threads (default: all cores)"
WORKERS_HELP = ("run as the root of a cluster: the workers' host:port list, e.g. pi1:9999,pi2:9999 (each started with "
                "`dllama-run worker`); nodes = 1 + workers, any count up to the model's heads (dllama-run plan)")
BUFFER_HELP = ("how nodes exchange activations: q80 (default for q40/q80 models on a cluster) or f32 (default for f32 "
               "models, and on one node, where nothing crosses a network; q80 there rounds like the reference)")
WEIGHTS_HELP = ("with --workers: each node's relative share, the root's first (e.g. 2,1,1 for a root twice as fast as "
                "its two workers), or auto (from each node's free memory and a short speed probe when the root "
                "connects); default equal shares")
ROOT_COMPUTE_HELP = ("with --workers: all (the root computes a share too) or none (it only coordinates: tokenizer, "
                     "embedding, sampling, API; the workers hold every layer)")

CLUSTER_KEY_HELP = ("a file holding the cluster key (at least 16 bytes, e.g. `openssl rand -hex 32`), the same on the "
                    "root and every worker: each side proves it holds the key and every frame is authenticated; "
                    "default: $DLLAMA_CLUSTER_KEY, else no key (never on the command line, where `ps` shows it)")


def complete_model(incomplete: str) -> list[str]:
    """Shell completion of MODEL: stored names (the shell adds file names when there is none)."""
    from dllama import store

    return [name for name in store.names() if name.startswith(incomplete)]


SOURCE = typer.Argument(None, metavar="MODEL", help=SOURCE_HELP, show_default=False, autocompletion=complete_model)
RUN_SOURCE = typer.Option(None, RUN_MODEL, hidden=True)  # dllama-run's own MODEL argument (ModelFirstGroup)
MODEL = typer.Option(None, help=MODEL_HELP)
TOKENIZER = typer.Option(None, help=TOKENIZER_HELP)
QUANT = typer.Option(None, "--quant", help=QUANT_HELP)
MAX_SEQ_LEN = typer.Option(DEFAULT_MAX_SEQ_LEN, min=1, help=SEQ_HELP)
NTHREADS = typer.Option(None, "--threads", min=1, help=THREADS_HELP)  # --nthreads: a hidden alias (command_group)
SEED = typer.Option(None, help="random seed for sampling (default: from the OS)")
TEMPERATURE = typer.Option(0.8, min=0.0, help="sampling temperature; 0 is greedy")
TOP_K = typer.Option(40, min=0, help="sample among the k most likely tokens (0: no limit)")
MIN_P = typer.Option(0.05, min=0.0, max=1.0, help="drop tokens less likely than this fraction of the most likely one")
REPEAT_PENALTY = typer.Option(None, min=0.0, help="divide positive logits (multiply negative ones) of the tokens in "
                              "the last --repeat-last-n by this; default 1.1 when sampling, off (1) at --temperature 0")
REPEAT_LAST_N = typer.Option(64, min=0, help="how many recent tokens (prompt and answer) --repeat-penalty looks at")
PRESENCE_PENALTY = typer.Option(0.0, min=-2.0, max=2.0, help="subtract this from the logit of every token the "
                                "answer already holds (OpenAI's presence_penalty)")
FREQUENCY_PENALTY = typer.Option(0.0, min=-2.0, max=2.0, help="subtract this times its count in the answer from a "
                                 "token's logit (OpenAI's frequency_penalty)")
STOP = typer.Option(None, help="end the answer before this text (not shown); repeatable")
WORKERS = typer.Option(None, help=WORKERS_HELP)
BUFFER_FLOAT_TYPE = typer.Option(None, help=BUFFER_HELP)
WEIGHTS = typer.Option(None, help=WEIGHTS_HELP)
ROOT_COMPUTE = typer.Option("all", help=ROOT_COMPUTE_HELP)
CLUSTER_KEY_FILE = typer.Option(None, "--cluster-key-file", help=CLUSTER_KEY_HELP)
EXCHANGE = typer.Option("mesh", help="with --workers: mesh (each node sends its partials straight to every other over "
                                     "links the workers open to each other at start-up), slices (over the same links "
                                     "each worker sums a slice and sends it to all: fewer bytes, twice the latencies; "
                                     "for many nodes on slow links, see docs/CLUSTER.md) or star (through the root); "
                                     "mesh and slices fall back to star, saying so, when a worker cannot reach another")
AS_JSON = typer.Option(False, "--json", help="print JSON instead of text")

