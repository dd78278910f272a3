"""What an OpenAI-style server in Python holds before it holds a model: the floor under serve's memory.

    python benchmarks/serve_memory_floor.py [--tokenizer .bench/vsllama/dllama_tokenizer_smollm2.t]

Issue 25's must-hold 4 bounds serve's peak RSS by weights + N x one slot's KV cache + 60 MB. This
starts, in a child process, a server with none of dllama's runtime: the libraries `dllama-run serve`
imports (numpy, typer, pydantic, prometheus_client, starlette, uvicorn) and the Hugging Face tokenizer
embedded in the `.t` (what makes its tokens Hugging Face's), answering one request that encodes a text
through it, and prints that process's RSS beside the 60 MB the bound leaves for everything but the
weights and the KV cache. No engine, no weights, no activations: whatever serve adds comes on top.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from serve_helpers import free_port  # noqa: E402

ALLOWANCE_MIB = 60e6 / 2**20

CHILD = r"""
import ctypes, gc, os, re, sys, threading, urllib.request
import numpy, typer, pydantic, prometheus_client, uvicorn, tokenizers
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from dllama.formats import EmbeddedKind, read_tokenizer

source = read_tokenizer(sys.argv[1]).embedded_source(EmbeddedKind.TOKENIZER_JSON)
tok = tokenizers.Tokenizer.from_str(source.decode())
del source
gc.collect()
ctypes.CDLL(None).malloc_trim(0)

async def encode(request):
    return JSONResponse({"ids": tok.encode("The capital of France is").ids})

ready = threading.Event()

def report(port):
    ready.wait(60)
    urllib.request.urlopen(f"http://127.0.0.1:{port}/").read()
    status = open("/proc/self/status").read()
    print(int(re.search(r"VmRSS:\s+(\d+)", status).group(1)), flush=True)
    os._exit(0)

class Server(uvicorn.Server):
    async def startup(self, sockets=None):
        await super().startup(sockets)
        ready.set()

port = int(sys.argv[2])
threading.Thread(target=report, args=(port,), daemon=True).start()
Server(uvicorn.Config(Starlette(routes=[Route("/", encode)]), host="127.0.0.1", port=port, log_level="error",
                      ws="none")).run()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=ROOT / ".bench" / "vsllama" / "dllama_tokenizer_smollm2.t")
    args = parser.parse_args()
    if not args.tokenizer.is_file():
        sys.exit(f"no tokenizer {args.tokenizer}: pass --tokenizer T.t (benchmarks/vs_llamacpp.py makes this one)")
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.tokenizer), str(free_port())], capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    if out.returncode != 0 or not out.stdout.strip():
        sys.exit(f"the floor server failed: {out.stderr.strip()[-400:]}")
    rss_mib = int(out.stdout.split()[-1]) / 1024
    print(f"libraries + {args.tokenizer.name}'s Hugging Face tokenizer, serving one request: {rss_mib:.1f} MiB RSS; "
          f"the bound leaves {ALLOWANCE_MIB:.1f} MiB (60 MB) beside the weights and KV cache: "
          f"{rss_mib - ALLOWANCE_MIB:+.1f} MiB before any engine")


if __name__ == "__main__":
    main()
