"""The main job end to end on a bundled example, with no network.

Run from anywhere: `python examples/run_example.py`. Each step is one function and prints what
it did; later steps (validate, run, a 2-node cluster) append here in the same style.

  1. build a small random Llama-shaped Hugging Face checkpoint under examples/tiny-hf/
     (weights from dllama.converter.synthetic, the bundled byte-level BPE tokenizer)
  2. convert it to examples/out/dllama_model_tiny_{q40,f32}.m and dllama_tokenizer_tiny.t
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from dllama.converter.cli import summary_text
from dllama.converter.convert import convert
from dllama.converter.synthetic import tiny_config, write_checkpoint

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / "tiny-hf"
OUT = HERE / "out"
TOKENIZER = HERE / "tokenizer"  # tokenizer.json + tokenizer_config.json (see tokenizer/train.py)
NAME = "tiny"

# A small Llama: GQA (4 heads, 2 kv heads), vocab matching the bundled tokenizer (bos 510, eos 511)
CONFIG = tiny_config(
    "llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, bos_token_id=510, eos_token_id=511,
)


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def build_checkpoint() -> Path:
    step(f"1. build a random Hugging Face checkpoint in {CHECKPOINT.relative_to(HERE.parent)}")
    shutil.rmtree(CHECKPOINT, ignore_errors=True)
    write_checkpoint(CHECKPOINT, CONFIG, dtype="bf16", seed=0, tokenizer=TOKENIZER)
    for f in sorted(CHECKPOINT.iterdir()):
        print(f"  {f.name:28} {f.stat().st_size:>10} bytes")
    return CHECKPOINT


def convert_checkpoint(checkpoint: Path) -> dict[str, Path]:
    step(f"2. convert it (dllama-convert hf {checkpoint.relative_to(HERE.parent)} --quant q40|f32 "
         f"--name {NAME} --output-dir {OUT.relative_to(HERE.parent)})")
    outputs = {}
    for quant in ("q40", "f32"):
        result = convert(checkpoint, quant, OUT, name=NAME)
        print(summary_text(result))
        outputs[quant] = result.plan.model_path
        outputs["tokenizer"] = result.plan.tokenizer_path
    return outputs


def main() -> int:
    started = time.perf_counter()
    checkpoint = build_checkpoint()
    outputs = convert_checkpoint(checkpoint)
    print(f"\ndone in {time.perf_counter() - started:.1f} s: {', '.join(str(p.relative_to(HERE.parent)) for p in outputs.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
