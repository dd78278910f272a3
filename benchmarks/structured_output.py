"""What a json_schema costs per generated token: decode tok/s with and without the grammar, paired.

    flock /tmp/dllama-bench.lock python benchmarks/structured_output.py             # SmolLM2 q80 from the cache
    flock /tmp/dllama-bench.lock python benchmarks/structured_output.py --model M.m --tokenizer T.t --pairs 8

For each prompt: greedy generation constrained by a JSON schema (runtime/structured.py), then the
same prompt unconstrained for the same number of tokens (eos ignored); every other pair runs
the grammar again after it, so that each order is measured. Decode time runs from the first
generated token to the last (the prompt's prefill is left out); the grammar's own time (mask,
advance) is also clocked inside the run.
Results go to stdout as one JSON object; record them in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dllama.runtime.engine import Engine  # noqa: E402
from dllama.runtime.generate import generate  # noqa: E402
from dllama.runtime.structured import GrammarVocabulary, json_schema_grammar  # noqa: E402
from dllama.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "hobbies"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                         "city": {"type": "string", "maxLength": 40},
                         "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4}}}
PROMPTS = ["Describe a fisherman from Norway.", "Invent a character for a детектив novel.",
           "Who is a typical baker in Lyon?", "Make up a person who loves chess.", "Describe a retired astronaut.",
           "Invent a young painter.", "Describe a nurse in Tokyo.", "Make up a farmer who keeps bees."]


class TimedConstraint:
    """A GrammarConstraint whose calls are clocked: the mask and its unpacking, advancing the parser
    (the sampler's np.where over the logits is not in it; the paired tok/s ratio covers it)."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0

    def allowed(self, n_logits: int):
        start = time.perf_counter()
        try:
            return self.inner.allowed(n_logits)
        finally:
            self.seconds += time.perf_counter() - start

    def advance(self, token: int) -> None:
        start = time.perf_counter()
        self.inner.advance(token)
        self.seconds += time.perf_counter() - start

    @property
    def done(self) -> bool:
        return self.inner.done


def decode_run(engine, ids, max_tokens, eos_ids, constraint=None) -> tuple[int, float]:
    """(tokens, seconds from the first token to the last)."""
    engine.reset()
    first = None
    n = 0
    for _ in generate(engine, ids, max_tokens, eos_ids=eos_ids, constraint=constraint):
        n += 1
        if first is None:
            first = time.perf_counter()
    return n, time.perf_counter() - first


def smollm2_files(quant: str, out: Path) -> tuple[Path, Path]:
    from dllama.converter.convert import convert
    from dllama.samples import cached

    gguf = cached()
    if gguf is None:
        sys.exit("SmolLM2's GGUF is not in the cache: run `python -m dllama.samples` once")
    result = convert(gguf, quant, out, name="smollm2")
    return result.plan.model_path, result.plan.tokenizer_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--quant", default="q80")
    parser.add_argument("--pairs", type=int, default=len(PROMPTS))
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--nthreads", type=int)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = (args.model, args.tokenizer) if args.model else smollm2_files(args.quant, Path(tmp))
        engine = Engine.load(str(model), max_seq_len=1024, nthreads=args.nthreads)
        tok = Tokenizer.load(str(tokenizer))
        start = time.perf_counter()
        vocab = GrammarVocabulary.of(tok)
        vocabulary_s = time.perf_counter() - start
        grammar = json_schema_grammar(SCHEMA)
        rows = []
        for i, prompt in enumerate((PROMPTS * args.pairs)[:args.pairs]):
            ids = tok.encode_chat([{"role": "user", "content": f"{prompt} Answer in JSON."}])
            timed = TimedConstraint(vocab.constraint(grammar))
            n, json_s = decode_run(engine, ids, args.max_tokens, tok.eos_ids, timed)
            _, free_s = decode_run(engine, ids, n, ())  # as many tokens as the JSON answer had, eos ignored
            if i % 2:  # every other pair runs the grammar second (greedy: the same tokens again)
                timed = TimedConstraint(vocab.constraint(grammar))
                n, json_s = decode_run(engine, ids, args.max_tokens, tok.eos_ids, timed)
            rows.append({"prompt": prompt, "tokens": n, "json_tok_s": (n - 1) / json_s, "free_tok_s": (n - 1) / free_s,
                         "grammar_ms_per_token": 1000 * timed.seconds / n, "grammar_share": timed.seconds / json_s})
        ratio = [r["json_tok_s"] / r["free_tok_s"] for r in rows]
        print(json.dumps({
            "model": str(model), "pairs": len(rows), "vocabulary_build_s": round(vocabulary_s, 3),
            "median_json_tok_s": round(statistics.median(r["json_tok_s"] for r in rows), 2),
            "median_free_tok_s": round(statistics.median(r["free_tok_s"] for r in rows), 2),
            "median_ratio_json_over_free": round(statistics.median(ratio), 3),
            "median_grammar_ms_per_token": round(statistics.median(r["grammar_ms_per_token"] for r in rows), 3),
            "median_grammar_share_of_decode": round(statistics.median(r["grammar_share"] for r in rows), 4),
            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
