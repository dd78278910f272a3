"""Activation statistics for the error-aware q40 encoder: the original model run on a calibration text.

The input of every matrix the `.m` stores as q40 is recorded while the ORIGINAL checkpoint runs in
float32 (the validator's reference forward, dllama.validate.reference, one layer's weights read at
a time): per input channel, the mean square of the activation. A weight's quantization error
reaches the output multiplied by its channel's activation, so that mean square is how much each
column's error costs (the diagonal of the layer's Hessian), which the encoder minimises.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from dllama.errors import DllamaError

# A small built-in English text (prose, dialogue, instructions, code, numbers), written for this
# file and unlike the validator's prompts, so that the validator does not grade its own
# calibration. `dllama-convert --calibration FILE` replaces it.
CALIBRATION_TEXT = """\
The old lighthouse keeper climbed the spiral stairs every evening at dusk. He had done it for
thirty-one years, and although the lamp had long since been automated, he still wiped the glass
and checked the lens by hand. "Machines forget," he liked to say, "but salt never does."

When the storm arrived in late October, the village lost power for three days. Families gathered
in the church hall, where volunteers served soup from large steel pots and children played cards
by candlelight. On the second night a fishing boat radioed for help: its engine had failed eleven
miles off the coast, and the waves were rising.

User: Can you explain how a refrigerator keeps food cold?
Assistant: Sure. A refrigerator moves heat from the inside to the outside. A liquid called a
refrigerant evaporates in coils inside the fridge, absorbing heat as it turns into a gas. A
compressor then squeezes the gas, which heats it up, and the hot gas releases that heat through
coils on the back of the fridge before condensing into a liquid again. The cycle repeats.

User: Write a short email asking my manager for Friday off.
Assistant: Subject: Request for leave on Friday

Hi Sarah,

I would like to request this Friday off to attend a family event. My tasks for the week will be
finished by Thursday afternoon, and Tom has agreed to cover any urgent requests. Please let me
know if that works for you.

Best regards,
Daniel

Photosynthesis converts light energy into chemical energy. In the chloroplasts of plant cells,
water molecules are split, oxygen is released, and carbon dioxide from the air is fixed into
sugars. Roughly half of the oxygen in the atmosphere comes from tiny marine algae.

    import json
    from pathlib import Path

    def load_settings(path: Path) -> dict:
        \"\"\"Read a JSON settings file, returning an empty dict if it does not exist.\"\"\"
        if not path.exists():
            return {}
        with path.open() as f:
            return json.load(f)

    for i, name in enumerate(["alpha", "beta", "gamma"]):
        print(f"{i}: {name.upper()}")

The invoice lists 12 items at $4.75 each, plus a shipping fee of $8.20, for a total of $65.20.
In 1969, Apollo 11 landed on the Moon; the mission lasted 8 days, 3 hours and 18 minutes.
Step 1: preheat the oven to 180 degrees. Step 2: mix 250 g of flour with 2 eggs and 100 ml of milk.

History is full of small decisions with large consequences. A merchant who chose one harbour over
another, a scholar who copied a manuscript instead of discarding it, a doctor who insisted that
surgeons wash their hands: each changed the lives of people they would never meet.
"""

SEQUENCE_TOKENS = 128  # each calibration sequence starts with bos, as prompts do
CALIBRATION_FLOPS = 60e9  # the forward's budget: fewer tokens for a bigger model (its matmuls dominate)
MIN_TOKENS, MAX_TOKENS = 16, 512


class CalibrationError(DllamaError, ValueError):
    """The calibration text cannot be used."""


def read_calibration_text(path: Path | None) -> str:
    if path is None:
        return CALIBRATION_TEXT
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"cannot read the calibration text {path} ({e}); give a UTF-8 text file") from None
    if not text.strip():
        raise CalibrationError(f"the calibration text {path} is empty; give a file of English (or the model's) text")
    return text


def calibration_sequences(ids: list[int], bos_id: int | None, n_params: int) -> list[list[int]]:
    """The text's token ids (no bos) cut into sequences of SEQUENCE_TOKENS, bos first, at most as many
    tokens as the forward's budget allows for a model of n_params weights."""
    budget = int(min(MAX_TOKENS, max(MIN_TOKENS, CALIBRATION_FLOPS / (2 * max(n_params, 1)))))
    ids = ids[:budget]
    step = SEQUENCE_TOKENS - (bos_id is not None)
    head = [] if bos_id is None else [bos_id]
    return [head + ids[i:i + step] for i in range(0, len(ids), step)]


@dataclass(frozen=True)
class Fold:
    """Matrices sharing one input that comes out of a float32 RMSNorm weight: their input channels can
    be scaled by s with the norm's weight divided by s, an identity in real arithmetic (FORMAT.md §2:
    y = rmsnorm(x) * norm, then W y = (W diag(s)) (y / s))."""

    feeds: str              # the input's key (ActivationStats)
    norm: str               # the RMSNorm weight that absorbs 1 / s
    matrices: tuple[str, ...]


def folds(config: dict) -> list[Fold]:
    """Every fold of a model: attention inputs, FFN inputs (not moe's: its router reads the FFN norm's
    output in float32 too), the head (its rows are the embedding's when tied; the embedding itself
    stays as it is, a separate float32 tensor)."""
    out = []
    moe = bool(config.get("num_experts") or config.get("num_local_experts"))
    for layer in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{layer}."
        qkv = tuple(f"{p}self_attn.{n}_proj.weight" for n in "qkv")
        out.append(Fold(qkv[0], p + "input_layernorm.weight", qkv))
        if not moe:
            ffn = (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
            out.append(Fold(ffn[0], p + "post_attention_layernorm.weight", ffn))
    out.append(Fold("lm_head.weight", "model.norm.weight", ("lm_head.weight",)))
    return out


ALPHAS = (0.0, 0.125, 0.25, 0.375, 0.5)  # s = rms(channel) ** alpha, the best on the calibration text
SAMPLE_ROWS = 128  # rows of each matrix the choice of alpha is measured on
TRIAL_THREADS = 2


@dataclass
class ActivationStats:
    """Mean square per input channel of each matrix's input, keyed by the Hugging Face name of the
    matrix (q/k/v share q_proj's input, gate/up share gate_proj's), and the channel scales chosen
    for each Fold (keyed by its input)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    scales: dict[str, np.ndarray] = field(default_factory=dict)
    norms: dict[str, str] = field(default_factory=dict)  # norm weight -> the input whose scales it absorbs

    def add(self, feeds: str, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        self.sums[feeds] = self.sums.get(feeds, 0.0) + (x * x).sum(axis=0)
        self.counts[feeds] = self.counts.get(feeds, 0) + x.shape[0]

    def mean_square(self, hf_name: str) -> np.ndarray | None:
        """The mean square of what `hf_name` multiplies, or None when it never ran (an unused expert)."""
        key = _input_key(hf_name)
        if self.counts.get(key, 0) == 0:
            return None
        return (self.sums[key] / self.counts[key]).astype(np.float32)

    def column_scale(self, hf_name: str, cols: int) -> np.ndarray:
        return self.scales.get(_input_key(hf_name), np.ones(cols, np.float32))

    def norm_divisor(self, hf_name: str) -> np.ndarray | None:
        """What a norm weight is divided by (its fold's channel scales), or None."""
        key = self.norms.get(hf_name)
        return None if key is None else self.scales[key]

    def importance(self, hf_name: str, cols: int) -> np.ndarray:
        """Per column of `hf_name` (after its channel scaling), what its quantization error costs: the
        input's mean square (divided by the scale squared), with a floor (1e-3 of the mean) so that no
        column is free; ones when the matrix never ran."""
        ms = self.mean_square(hf_name)
        if ms is None or not ms.any():
            return np.ones(cols, np.float32)
        ms = ms + np.float32(1e-3) * ms.mean()
        return (ms / self.column_scale(hf_name, cols) ** 2).astype(np.float32)

def _input_key(hf_name: str) -> str:
    for shared, first in (("k_proj", "q_proj"), ("v_proj", "q_proj"), ("up_proj", "gate_proj")):
        hf_name = hf_name.replace(f".{shared}.", f".{first}.")
    return hf_name


def gather_statistics(checkpoint, sequences: list[list[int]], frozen: set[str] = frozenset(),
                      fold: bool = True) -> ActivationStats:
    """Run the original checkpoint (float32) on the sequences, layer by layer, recording every
    quantized matrix's input, and choose each Fold's channel scales (`fold`; none through a `frozen`
    matrix, one the `.m` takes as stored). Memory: one layer's weights in float32 and the sequences'
    states."""
    from dllama.validate.reference import ReferenceModel, TraceBuilder, rmsnorm

    stats = ActivationStats()
    lm_head = "lm_head.weight" if "lm_head.weight" in checkpoint else "model.embed_tokens.weight"
    by_input = {f.feeds: f for f in folds(checkpoint.config)
                if fold and f.feeds not in frozen and not frozen.intersection(f.matrices)}
    folded = {m for f in by_input.values() for m in f.matrices}
    inputs: dict[str, np.ndarray] = {}
    rows: dict[str, np.ndarray] = {}
    from dllama.converter.convert import ReusedBuffer

    buffer = ReusedBuffer()

    class Observed(ReferenceModel):
        def matmul_input(self, x: np.ndarray, feeds: str) -> np.ndarray:
            stats.add(feeds, x)
            if feeds in by_input:
                inputs[feeds] = x
            return x

        def embed(self, prompts: list[list[int]]) -> np.ndarray:  # only the rows needed (a 1B's is 262 MB)
            ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in prompts])
            unique, where = np.unique(ids, return_inverse=True)
            return self.ckpt.get_rows("model.embed_tokens.weight", unique)[where]

        def matrix(self, name: str) -> np.ndarray:
            # valid until the next call (the reference multiplies each matrix before it asks for the
            # next): one buffer, not a fresh one whose every page faults in; the map's pages can go
            w = _read_float32(checkpoint, name, buffer)
            checkpoint.release()
            if name in folded:
                rows[name] = w[_sampled(w.shape[0])]
            return w

    def choose_scales() -> None:
        for feeds, x in inputs.items():
            f = by_input[feeds]
            stats.scales[feeds] = best_channel_scale(x, stats.mean_square(feeds), [rows.pop(m) for m in f.matrices])
            stats.norms[f.norm] = feeds
        inputs.clear()

    model = Observed(checkpoint)
    run = TraceBuilder(model, sequences, keep_states=False)
    # BLAS on one thread: a few dozen tokens times a matrix is too little work to share; with another
    # job on the cores, OpenBLAS's second thread made these products 3-7x slower, not 2x faster
    with threadpool_limits(1, user_api="blas"):
        for layer in range(model.cfg.n_layers):
            run.layer(layer)
            checkpoint.release()  # the maps' pages would otherwise count towards the resident set
            choose_scales()
        y = rmsnorm(run.states[-1], model.w("model.norm.weight"), model.cfg.eps)
        stats.add("lm_head.weight", y)
        if "lm_head.weight" in by_input:
            inputs["lm_head.weight"] = y
            rows["lm_head.weight"] = checkpoint.get_rows(lm_head, _sampled(checkpoint.entries[lm_head].shape[0]))
            choose_scales()
    checkpoint.release()
    return stats


def _read_float32(checkpoint, name: str, buffer) -> np.ndarray:
    """checkpoint.get(name), widened on every core into `buffer` (a convert.ReusedBuffer) for a safetensors
    bf16/f16/f32 matrix (numpy's widening is single-threaded, and the calibration reads every weight once more)."""
    from dllama.checkpoint import Checkpoint
    from dllama.converter import encoders

    entry = checkpoint.entries.get(name) if isinstance(checkpoint, Checkpoint) else None
    kinds = {"BF16": (encoders.SRC_BF16, "<u2"), "F16": (encoders.SRC_F16, "<u2"), "F32": (encoders.SRC_F32, "<u4")}
    if entry is None or entry.dtype not in kinds or len(entry.shape) != 2:
        return checkpoint.get(name)
    kind, stored = kinds[entry.dtype]
    rows, cols = entry.shape
    src = np.asarray(checkpoint.stored(name)).view(stored).reshape(rows, cols)
    out = buffer.get(rows * cols * 4).view(np.float32).reshape(rows, cols)
    encoders.encode_f32(src, kind, np.arange(rows), out.view(np.uint32))
    return out


def _sampled(n_rows: int) -> np.ndarray:
    return np.unique(np.linspace(0, n_rows - 1, min(n_rows, SAMPLE_ROWS)).astype(np.int64))


def best_channel_scale(x: np.ndarray, mean_square: np.ndarray, matrices: list[np.ndarray]) -> np.ndarray:
    """The channel scales s = rms ** alpha (alpha in ALPHAS, 0: none) whose q40 matrices best
    reproduce the float32 outputs on the calibration inputs x: sum ||Q(W s) q80(x / s) - W x||^2
    over the sampled rows, q80 as the runtime quantizes its activations (AWQ's search)."""
    from dllama.validate.reference import q80_round

    ms = mean_square + np.float32(1e-3) * mean_square.mean()
    exact = [w @ x.T for w in matrices]

    def trial(alpha: float) -> tuple[np.ndarray, float]:
        s = ms ** np.float32(alpha / 2)
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        xs = q80_round((x / s).astype(np.float32))
        return s, sum(float(((quantized(w * s, ms / s ** 2) @ xs.T - out) ** 2).sum())
                      for w, out in zip(matrices, exact))

    # the trials on both cores: the forward's products leave one idle (BLAS on one thread), and the
    # search kernel and the products release the GIL; the choice is the same as in order
    with ThreadPoolExecutor(TRIAL_THREADS) as pool:
        trials = list(pool.map(trial, ALPHAS))
    best, best_err = np.ones_like(ms), np.inf
    for s, err in trials:
        if err < best_err:
            best, best_err = s, err
    return best


def quantized(w: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """w through the error-aware q40 encoder and back."""
    from dllama.converter.encoders import SRC_F32, encode_q40_search_serial
    from dllama.formats import Q40_BYTES, dequantize_q40

    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    out = np.empty((rows, cols // 32 * Q40_BYTES), np.uint8)
    encode_q40_search_serial(w.view(np.uint32), SRC_F32, np.arange(rows), np.ones(cols, np.float32), importance, out)
    return dequantize_q40(out.reshape(-1)).reshape(rows, cols)
