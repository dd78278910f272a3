"""The two logit checks: is the file computed right (correctness), and what does quantizing cost (quality)?

logits.correctness: our runtime must compute what the file specifies. A q40/q80 file specifies
an arithmetic (weights rounded through its codec, matmul inputs quantized to q80): the
reference runs the ORIGINAL checkpoint with it (reference.Arithmetic) and records x before every
attention and FFN block; each block of our runtime gets exactly that x and must return the
reference's block output, and the head the reference's logits. Comparing whole runs instead
cannot be exact: a last-bit difference flips a q80 rounding, and within one layer the two runs
carry independent quantization noise (docs/VALIDATE.md). An f32 file's arithmetic is the exact
original's: there whole runs are compared.

A file from the error-aware q40 encoder (dllama-convert without --exact) is not the reference
codec's rounding of the original, so nearly every block differs from that run; when most do, the
blocks are compared instead with the file's own arithmetic (FileBlocks: the reference forward on
the file's weights as stored): the runtime is checked, and model.weights_vs_checkpoint (--hf)
checks the weights against the original.

logits.quality: our runtime's whole run against the exact original: top-1 agreement, mean and
p99 KL, perplexity ratio on the built-in prompts, graded in words. Only garbage fails.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from dllama.formats import FloatType
from dllama.validate.reference import ReferenceLogits, Trace
from dllama.validate.report import CheckResult, failed, passed, skipped, warned

Progress = Callable[[int, int], None]


class RuntimeBlocks(Protocol):
    """Our runtime's blocks on one prompt starting at position 0 (validator.EngineBlocks)."""

    n_layers: int

    def attention(self, layer: int, x: np.ndarray) -> np.ndarray:
        """x (T, dim) before layer's attention block -> its output Wo z (T, dim)."""

    def ffn(self, layer: int, x: np.ndarray) -> np.ndarray:
        """x (T, dim) before layer's FFN block -> its output (T, dim)."""

    def logits(self, x: np.ndarray) -> np.ndarray:
        """x (T, dim) after the last layer -> logits (T, vocab)."""


# --------------------------------------------------------------------------------------------
# Comparing logits

def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """KL(reference || ours) per row, nats."""
    lp_ref, lp_ours = log_softmax(reference), log_softmax(ours)
    return np.sum(np.exp(lp_ref) * (lp_ref - lp_ours), axis=-1)


@dataclass(frozen=True)
class LogitStats:
    top1: float      # fraction of positions whose argmax agrees
    mean_kl: float   # KL(reference || ours), nats
    p99_kl: float
    max_kl: float
    max_abs: float   # max |logit difference| relative to the reference's max |logit|

    @classmethod
    def of(cls, ours: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> "LogitStats":
        ours, reference = np.concatenate(list(ours)), np.concatenate(list(reference))
        kl = kl_divergence(ours, reference)
        scale = float(np.abs(reference).max()) or 1.0
        return cls(top1=float(np.mean(ours.argmax(-1) == reference.argmax(-1))), mean_kl=float(kl.mean()),
                   p99_kl=float(np.percentile(kl, 99)), max_kl=float(kl.max()),
                   max_abs=float(np.abs(ours - reference).max()) / scale)

    def describe(self) -> str:
        return f"top1 {self.top1:.3f} KL mean {self.mean_kl:.2g} p99 {self.p99_kl:.2g} abs {self.max_abs:.2g}"


def reference_problem(vocab_size: int, reference: ReferenceLogits) -> str | None:
    if reference.vocab_size != vocab_size:
        return (f"the reference logits have {reference.vocab_size} columns but the model {vocab_size}: "
                "they come from another model, or the .m has the wrong vocab_size")
    if any(i.size and i.max() >= vocab_size for i in reference.ids):
        return "the reference prompts hold ids outside the model's vocabulary: the reference comes from another model"
    return None


# --------------------------------------------------------------------------------------------
# logits.correctness

@dataclass(frozen=True)
class CorrectnessLimits:
    max_block_error: float   # relative RMS error of any block's output, given the reference's input
    max_head_kl: float       # max KL of the head's logits, given the reference's last x
    max_head_abs: float      # max |logit difference| of the head, relative to the largest logit

    def describe(self) -> str:
        return f"block err<={self.max_block_error:g} head KL max<={self.max_head_kl:g} abs<={self.max_head_abs:g}"


@dataclass(frozen=True)
class WholeRunLimits:
    min_top1: float
    max_mean_kl: float
    max_kl: float
    max_abs: float

    def describe(self) -> str:
        return f"top1>={self.min_top1:g} KL mean<={self.max_mean_kl:g} max<={self.max_kl:g} abs<={self.max_abs:g}"


# Measured (docs/VALIDATE.md; benchmarks/validate.py thresholds and smollm2): correct f32 files
# agree with the exact original to KL 1.2e-11 (SmolLM2) and abs 1.7e-6; correct q40/q80 blocks
# to relative error <= 0.0023 (a few q80 roundings flipped by last-bit differences), heads to KL
# 3e-11. The smallest bug measured gives a block error of 0.15 (SmolLM2, rope_theta 10000).
F32_LIMITS = WholeRunLimits(min_top1=0.99, max_mean_kl=1e-7, max_kl=1e-6, max_abs=1e-4)
QUANTIZED_LIMITS = CorrectnessLimits(max_block_error=0.02, max_head_kl=1e-3, max_head_abs=0.02)


def block_outputs(blocks: RuntimeBlocks, trace: Trace, progress: Progress | None = None) -> tuple[dict[str,
                                                                                                           np.ndarray],
                                                                                                      np.ndarray]:
    """Each block's output on the reference's input ({block name: output}, in layer order), and the
    head's logits on the reference's last x."""
    states, bounds = trace.states, np.cumsum(trace.lengths)[:-1]
    outputs = {}
    for layer in range(blocks.n_layers):
        # positions start from 0 in every prompt
        outputs[f"layer {layer} attention"] = np.concatenate([blocks.attention(layer, x)
                                                             for x in np.split(states[2 * layer], bounds)])
        outputs[f"layer {layer} ffn"] = blocks.ffn(layer, states[2 * layer + 1])
        if progress:
            progress(layer + 1, blocks.n_layers + 1)
    head = np.asarray(blocks.logits(states[-1]), dtype=np.float32)
    if progress:
        progress(blocks.n_layers + 1, blocks.n_layers + 1)
    return outputs, head


def trace_outputs(trace: Trace) -> list[np.ndarray]:
    """The reference run's own block outputs, in block_outputs' order."""
    return [trace.states[i + 1] - trace.states[i] for i in range(len(trace.states) - 1)]


def relative_rms(got: np.ndarray, want: np.ndarray) -> float:
    want = want.astype(np.float64)
    scale = float(np.sqrt(np.mean(want ** 2)))
    diff = float(np.sqrt(np.mean((got.astype(np.float64) - want) ** 2)))
    if not np.isfinite(diff):
        return float("inf")
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def correctness_by_blocks(blocks: RuntimeBlocks, trace: Trace, kind: str, limits: CorrectnessLimits = QUANTIZED_LIMITS,
                          progress: Progress | None = None, file_blocks: RuntimeBlocks | None = None) -> CheckResult:
    """file_blocks: the file's own arithmetic, used when most blocks differ from the trace (an
    error-aware q40 file)."""
    outputs, head = block_outputs(blocks, trace, progress)
    wants, want_logits = trace_outputs(trace), trace.logits
    errors = [(n, relative_rms(got, want)) for (n, got), want in zip(outputs.items(), wants)]
    if file_blocks is not None and sum(not e <= limits.max_block_error for _, e in errors) > len(errors) / 2:
        kind = f"{kind} (the file's own weights)"
        wants, want_logits = file_block_outputs(file_blocks, trace)
        errors = [(n, relative_rms(got, want)) for (n, got), want in zip(outputs.items(), wants)]
    worst_name, worst = max(errors, key=lambda e: e[1])
    head_kl = kl_divergence(head, want_logits)
    scale = float(np.abs(want_logits).max()) or 1.0
    head_abs = float(np.abs(head - want_logits).max()) / scale
    measured = f"block err {worst:.2g} ({worst_name}), head KL max {head_kl.max():.2g} abs {head_abs:.2g}"
    details = dict(arithmetic=kind, block_errors={n: e for n, e in errors}, worst_block=worst_name,
                   head_max_kl=float(head_kl.max()), head_max_abs=head_abs, positions=int(sum(trace.lengths)),
                   limits=limits.__dict__)
    wrong = [n for n, e in errors if not e <= limits.max_block_error]
    if wrong:
        first = wrong[0]
        return failed("logits.correctness", measured, limits.describe(),
                      f"our runtime does not compute the original model's {kind} arithmetic: from {first} on "
                      f"({len(wrong)} of {len(errors)} blocks differ, first by {dict(errors)[first]:.2g}) the file's "
                      "weights or header "
                      "are wrong (see model.* checks), or the runtime is; reconvert", **details)
    if not (head_kl.max() <= limits.max_head_kl and head_abs <= limits.max_head_abs):
        return failed("logits.correctness", measured, limits.describe(),
                      "every layer matches but the logits do not: the final norm or lm_head (or the vocabulary) is "
                      "wrong; reconvert",
                      **details)
    return passed("logits.correctness", measured, limits.describe(), **details)


def file_block_outputs(file_blocks: RuntimeBlocks, trace: Trace) -> tuple[list[np.ndarray], np.ndarray]:
    """What the file's own arithmetic gives each block on the trace's inputs, and the head's logits."""
    states, bounds = trace.states, np.cumsum(trace.lengths)[:-1]
    wants = []
    for layer in range(file_blocks.n_layers):
        wants.append(np.concatenate([file_blocks.attention(layer, x) for x in np.split(states[2 * layer], bounds)]))
        wants.append(file_blocks.ffn(layer, states[2 * layer + 1]))
    return wants, np.asarray(file_blocks.logits(states[-1]), dtype=np.float32)


def correctness_by_whole_run(ours: list[np.ndarray], reference: ReferenceLogits,
                             limits: WholeRunLimits = F32_LIMITS) -> CheckResult:
    s = LogitStats.of(ours, reference.logits)
    details = dict(arithmetic="exact", summary=s.__dict__, limits=limits.__dict__)
    measured = f"top1 {s.top1:.3f} KL mean {s.mean_kl:.2g} max {s.max_kl:.2g} abs {s.max_abs:.2g}"
    broken = [what for what, bad in ((f"top-1 {s.top1:.3f}", s.top1 < limits.min_top1),
                                     (f"mean KL {s.mean_kl:.3g}", not s.mean_kl <= limits.max_mean_kl),
                                     (f"max KL {s.max_kl:.3g}", not s.max_kl <= limits.max_kl),
                                     (f"abs {s.max_abs:.3g}", not s.max_abs <= limits.max_abs)) if bad]
    if broken:
        return failed("logits.correctness", measured, limits.describe(),
                      "an f32 file computes the exact original, but our runtime's logits differ "
                      f"({', '.join(broken)}): "
                      "the weights or header are wrong (see model.* checks), or the runtime is; reconvert", **details)
    return passed("logits.correctness", measured, limits.describe(), **details)


# --------------------------------------------------------------------------------------------
# logits.quality

@dataclass(frozen=True)
class Grade:
    name: str
    max_mean_kl: float   # the grade holds up to this mean KL(original || ours)
    meaning: str


# Bands on mean KL alone (top-1 means nothing on the random-weight fixtures, whose near-uniform
# logits tie), set where published numbers put quantizations (llama.cpp's KL statistics of 7-8B
# models: Q8_0 ~0.001, Q4_K_M ~0.03, Q3 ~0.1-0.3, Q2 > 0.5) and our measurements (docs/VALIDATE.md).
GRADES = (
    Grade("excellent", 0.002, "indistinguishable from the original in use"),
    Grade("good", 0.03, "small differences in wording, same answers"),
    Grade("acceptable", 0.15, "noticeably different text, mostly the same content"),
    Grade("poor", float("inf"), "often different and worse answers"),
)
# Garbage, calibrated on SmolLM2 (docs/VALIDATE.md): the correct q40 file (KL 0.51, ppl x1.06)
# still writes sentences; with q/k rows not permuted (KL 1.6, ppl x3.8) it writes " 14.\n\n\n...".
# The lines sit near the geometric middle of the two.
GARBAGE_MAX_MEAN_KL = 1.0
GARBAGE_MAX_PPL_RATIO = 2.0


def grade_of(stats: LogitStats) -> Grade:
    return next(g for g in GRADES if stats.mean_kl <= g.max_mean_kl)


def quality(ours: list[np.ndarray], reference: ReferenceLogits, float_type: FloatType, n_params: int,
            reference_encoded: bool = False) -> CheckResult:
    """Our runtime's whole runs on every reference prompt against the exact original.
    reference_encoded: a q40 file whose blocks are the reference codec's (dllama-convert --exact)."""
    s = LogitStats.of(ours, reference.logits)
    ratio = perplexity_ratio(ours, reference)
    grade = grade_of(s)
    kind = float_type.name.lower()
    ppl = f", ppl x{ratio:.3g}" if ratio is not None else ""
    measured = f"{grade.name}: top1 {s.top1:.3f} KL mean {s.mean_kl:.2g} p99 {s.p99_kl:.2g}{ppl}"
    threshold = f"not garbage (KL mean<={GARBAGE_MAX_MEAN_KL:g}, ppl ratio<={GARBAGE_MAX_PPL_RATIO:g})"
    details = dict(grade=grade.name, meaning=grade.meaning, summary=s.__dict__, perplexity_ratio=ratio, weights=kind,
                   bands={g.name: g.max_mean_kl for g in GRADES})
    cost = f"{kind} costs KL {s.mean_kl:.2g} and {1 - s.top1:.0%} of top-1 tokens on this model"
    if not s.mean_kl <= GARBAGE_MAX_MEAN_KL or (ratio is not None and not ratio <= GARBAGE_MAX_PPL_RATIO):
        return failed("logits.quality", measured, threshold,
                      f"the output would be garbage ({cost}{ppl}): if logits.correctness passes, the original does not "
                      f"survive {kind} quantization: use {better_type(float_type)}", **details)
    if grade.name == "poor":
        advice = f"use {better_type(float_type, n_params)}"
        if reference_encoded and float_type == FloatType.Q40:
            advice = ("reconvert without --exact: the error-aware q40 encoder measured half the KL on SmolLM2-135M "
                      f"(docs/VALIDATE.md), or {advice}")
        return warned("logits.quality", measured, threshold, f"{cost}{ppl} ({grade.meaning}): {advice}", **details)
    return passed("logits.quality", measured, threshold, **details)


SMALL_MODEL_PARAMS = 1.5e9  # below this q40 costs too much quality: q80 (also dllama-run's default, dllama/store.py)


def better_type(float_type: FloatType, n_params: int | None = None) -> str:
    small = n_params and n_params < SMALL_MODEL_PARAMS
    size = f" for a model this small ({n_params / 1e6:.0f}M weights)" if small else ""
    return {FloatType.Q40: f"q80{size}", FloatType.Q80: "f32"}.get(float_type, "f32") + \
        ("" if float_type != FloatType.Q40 or size else " (or a larger model)")


def perplexity_ratio(ours: list[np.ndarray], reference: ReferenceLogits) -> float | None:
    """Our perplexity over the reference prompts (built-in texts) divided by the original's."""
    pairs = [(o, r, i) for o, r, i in zip(ours, reference.logits, reference.ids) if len(i) >= 2]
    if not pairs:
        return None
    return perplexity_of(pairs, 0) / perplexity_of(pairs, 1)


def perplexity_of(pairs, k: int) -> float:
    """exp(mean negative log-likelihood of each next token over all prompts) of pairs[.][k]'s logits."""
    nll = np.concatenate([-log_softmax(p[k][:-1])[np.arange(len(p[2]) - 1), p[2][1:]] for p in pairs])
    return float(np.exp(nll.mean()))


# --------------------------------------------------------------------------------------------
# Both checks

def run_prompts(run_model: Callable[[np.ndarray], np.ndarray], ids: list[np.ndarray],
                progress: Progress | None = None) -> list[np.ndarray]:
    """Our runtime's whole run on every prompt (`run_model` starts at position 0)."""
    out = []
    for j, prompt in enumerate(ids):
        out.append(np.asarray(run_model(prompt), dtype=np.float32))
        if progress:
            progress(j + 1, len(ids))
    return out


def logit_checks(run_model: Callable[[np.ndarray], np.ndarray], blocks: RuntimeBlocks, float_type: FloatType,
                 vocab_size: int, n_params: int, reference: ReferenceLogits,
                 progress: Callable[[str], Progress | None] = lambda stage: None,
                 file_blocks: RuntimeBlocks | None = None) -> list[CheckResult]:
    problem = reference_problem(vocab_size, reference)
    if problem:
        return [failed("logits.correctness", "-", "matching reference", problem),
                skipped("logits.quality", "the reference does not fit this model")]
    ours = run_prompts(run_model, reference.ids, progress("logits (whole runs)"))
    kind = float_type.name.lower()
    reference_encoded = False
    if float_type == FloatType.F32:
        correct = correctness_by_whole_run(ours, reference)
    elif kind in reference.traces:
        correct = correctness_by_blocks(blocks, reference.traces[kind], kind,
                                        progress=progress("logits (block by block)"), file_blocks=file_blocks)
        reference_encoded = correct.details.get("arithmetic") == kind
    else:
        correct = skipped("logits.correctness",
                          f"the reference has no run with {kind} arithmetic: give --hf SOURCE, or "
                                                f"write REF.npz with `dllama-validate reference --arithmetic {kind}`")
    return [correct, quality(ours, reference, float_type, n_params, reference_encoded)]


def skip_logits(reason: str) -> list[CheckResult]:
    return [skipped("logits.correctness", reason), skipped("logits.quality", reason)]
