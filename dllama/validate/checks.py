"""Structure checks: the `.m` header and bytes, the `.t`, and both against the Hugging Face source.

Each check is a function returning one CheckResult; the reason of a failure names the problem
and the fix. Everything reads through dllama.formats (the one owner of the layouts).
"""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import numpy as np

from dllama.checkpoint import Checkpoint, CheckpointError, header_from_config
from dllama.formats import (
    MODEL_MAGIC,
    OLD_MODEL_MAGICS,
    OLD_TOKENIZER_MAGIC,
    TOKENIZER_MAGIC,
    ArchType,
    FloatType,
    FormatError,
    HiddenAct,
    ModelFile,
    ModelHeader,
    RopeType,
    TensorSpec,
    TokenizerFile,
    decode_tensor,
    model_file_size,
    padded_vocabulary,
    permute_rotary_rows,
    read_model_header,
    read_tokenizer,
    tensor_plan,
)
from dllama.tokenizer.faithful import embedded_config
from dllama.validate.report import CheckResult, InputError, failed, passed, skipped, warned

# Relative RMS error of the stored weights against the checkpoint's (bf16/f16/f32) values.
# Measured on the conformance fixtures (docs/VALIDATE.md): f32 0, q80 0.0055, q40 0.089.
# A wrong tensor (unpermuted, swapped, another layer's) sits near sqrt(2) = 1.41.
WEIGHT_TOLERANCE = {FloatType.F32: 1e-6, FloatType.F16: 1e-3, FloatType.Q80: 0.02, FloatType.Q40: 0.2}
SAMPLE_ROWS = 64  # rows compared per matrix: the first ones (whole rotary heads) plus a spread


# --------------------------------------------------------------------------------------------
# Opening the inputs: unreadable input is an InputError (exit 2), a broken file a failed check

def require_model_magic(path: Path) -> None:
    _require_magic(path, "model", {MODEL_MAGIC, *OLD_MODEL_MAGICS}, "a distributed-llama .m model")


def require_tokenizer_magic(path: Path) -> None:
    _require_magic(path, "tokenizer", {TOKENIZER_MAGIC, OLD_TOKENIZER_MAGIC}, "a distributed-llama .t tokenizer")


def _require_magic(path: Path, what: str, magics: set[int], kind: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise InputError(f"{what} file {path} does not exist") from None
    except OSError as e:
        raise InputError(f"cannot read {what} file {path}: {e.strerror}") from None
    if len(head) < 4 or int.from_bytes(head, "little", signed=True) not in magics:
        raise InputError(f"{path} is not {kind} (wrong magic bytes); check the argument order: MODEL.m TOKENIZER.t")


def open_model(path: Path) -> tuple[ModelHeader | None, ModelFile | None, list[CheckResult]]:
    """The header check and the exact-size check; the ModelFile only when both pass."""
    try:
        header = read_model_header(path)
    except FormatError as e:
        return None, None, [failed("model.header", "unreadable", "valid header", f"{e}; reconvert with dllama-convert"),
                            skipped("model.file_size", "the header could not be read")]
    results = [header_sanity(header)]
    try:
        expected = model_file_size(header)
    except FormatError as e:
        return header, None, results + [failed("model.file_size", "-", "-",
                                               f"the header describes impossible tensors: {e}")]
    size = path.stat().st_size
    if size != expected:
        what = ("truncated (an interrupted copy or conversion?): copy or convert it again" if size < expected
                else "longer than its header describes: trailing bytes or a header from another model")
        return header, None, results + [failed("model.file_size", f"{size} bytes", f"exactly {expected}",
                                               f"{path.name} is {what}", size=size, expected=expected)]
    results.append(passed("model.file_size", f"{size} bytes", f"exactly {expected}", size=size))
    return header, ModelFile(path), results


def open_tokenizer(path: Path) -> tuple[TokenizerFile | None, CheckResult]:
    try:
        tf = read_tokenizer(path)
    except FormatError as e:
        return None, failed("tokenizer.file", "malformed", "well-formed .t",
                            f"{e}; reconvert the tokenizer with dllama-convert")
    return tf, passed("tokenizer.file", f"{tf.vocab_size} tokens, {len(tf.embedded)} embedded", "well-formed .t",
                      vocab_size=tf.vocab_size, embedded=[s.kind.name.lower() for s in tf.embedded])


# --------------------------------------------------------------------------------------------
# Model header and tensors

def header_sanity(h: ModelHeader) -> CheckResult:
    problems = header_problems(h)
    notes = header_notes(h)
    measured = f"{h.arch.name.lower()} {h.weights_float_type.name.lower()} {h.n_layers}x{h.dim}"
    if problems:
        return failed("model.header", measured, "supported values", "; ".join(problems))
    if notes:
        return warned("model.header", measured, "supported values", "; ".join(notes))
    return passed("model.header", measured, "supported values")


def header_problems(h: ModelHeader) -> list[str]:
    out = []
    if h.version != 0:
        out.append(f"version {h.version} (only 0 exists)")
    for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
        if getattr(h, name) <= 0:
            out.append(f"{name} is {getattr(h, name)}")
    if h.n_heads > 0 and h.n_kv_heads > 0 and h.n_heads % h.n_kv_heads:
        out.append(f"n_heads {h.n_heads} is not a multiple of n_kv_heads {h.n_kv_heads}")
    if h.n_heads > 0 and h.head_dim % 2:
        out.append(f"head_dim {h.head_dim} is odd, rope needs pairs")
    if h.is_moe and not 0 < h.n_active_experts <= h.n_experts:
        out.append(f"n_active_experts {h.n_active_experts} for {h.n_experts} experts")
    if h.arch == ArchType.QWEN3_MOE and not h.is_moe:
        out.append("qwen3_moe with 0 experts (a transformers-5 config read by the reference converter?)")
    if h.rope_type == RopeType.LLAMA3_1 and not (h.rope_scaling_factor and h.rope_scaling_orig_max_seq_len):
        out.append("llama3.1 rope without scaling factor / original max length")
    if h.rope_theta is not None and h.rope_theta <= 0:
        out.append(f"rope_theta {h.rope_theta}")
    return out


def header_notes(h: ModelHeader) -> list[str]:
    out = []
    if h.weights_float_type == FloatType.Q80:
        out.append("the reference C++ runtime refuses q80 weights (it runs q40 and f32); dllama-run runs them")
    if h.weights_float_type == FloatType.F16:
        out.append("neither dllama-run nor the reference C++ runtime runs f16 weights; reconvert to q40, q80 or f32")
    if h.hidden_act == HiddenAct.GELU:
        out.append("hidden_act gelu: both runtimes compute silu (FORMAT.md §2), so outputs will differ from the "
                   "original")
    return out


# bf16 bytes read as f16 turn every value with |x| in [2^-15, 2) into one with |x| in [0.5, 2) (the
# top five of bf16's eight exponent bits become f16's exponent, 01110 or 01111): measured on the
# SmolLM2 embedding, 0.7% of values lie there in the correct file and 100% in the misread one.
MISREAD_BF16_FRACTION = 0.9


def misread_bf16_fraction(values: np.ndarray) -> float:
    """The fraction of non-zero |values| in [0.5, 2)."""
    a = np.abs(values[values != 0])
    return float(np.mean((a >= 0.5) & (a < 2))) if a.size else 0.0


def tensor_health(mf: ModelFile) -> CheckResult:
    """Every scale/value finite, no all-zero tensor, an embedding that does not look like bf16
    read as f16; per-tensor statistics in the details."""
    stats, bad = {}, []
    for name in mf.names:
        s = tensor_stats(mf, name)
        stats[name] = s
        if s["non_finite"]:
            bad.append(f"{name} has {s['non_finite']} non-finite {'scales' if s['quantized'] else 'values'}")
        elif s["all_zero"]:
            bad.append(f"{name} is all zeros")
    misread = misread_bf16_fraction(np.asarray(mf.blocks("embedding"), dtype=np.float32).reshape(-1))
    if misread > MISREAD_BF16_FRACTION:
        bad.append(f"the embedding looks like bf16 bytes read as f16 ({misread:.0%} of its values have 0.5 <= |x| < 2; "
                   "a trained embedding's are small): the converter read a bf16 checkpoint as f16")
    measured = f"{len(mf.names) - len(bad)}/{len(mf.names)} tensors healthy"
    if bad:
        return failed("model.tensors", measured, "all finite, none all-zero",
                      f"{'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}: the conversion wrote garbage; reconvert",
                      tensors=stats)
    return passed("model.tensors", measured, "all finite, none all-zero", tensors=stats)


def tensor_stats(mf: ModelFile, name: str) -> dict:
    spec = mf.layout[name].spec
    data = mf.blocks(name)
    if spec.float_type in (FloatType.Q40, FloatType.Q80):
        d = data["d"].astype(np.float32).reshape(-1)
        finite = np.isfinite(d)
        absd = np.abs(d[finite])
        step_to_max = 8.0 if spec.float_type == FloatType.Q40 else 127.0  # FORMAT.md §1.2
        return {"quantized": True, "non_finite": int((~finite).sum()), "all_zero": bool(not np.any(absd)),
                "zero_blocks": float(np.mean(d == 0)), "mean_abs_scale": float(absd.mean()) if absd.size else 0.0,
                "abs_max": float(absd.max() * step_to_max) if absd.size else 0.0}
    x = np.asarray(data, dtype=np.float32).reshape(-1)
    finite = np.isfinite(x)
    non_finite = int(x.size - np.count_nonzero(finite))
    xs = x[finite] if non_finite else x
    return {"quantized": False, "non_finite": non_finite, "all_zero": bool(not np.any(xs)),
            "mean": float(xs.mean()) if xs.size else 0.0, "std": float(xs.std()) if xs.size else 0.0,
            "abs_max": float(np.abs(xs).max()) if xs.size else 0.0}


# --------------------------------------------------------------------------------------------
# Model against the Hugging Face checkpoint

def header_vs_config(h: ModelHeader, config: dict) -> CheckResult:
    """Every header field against what the original's config.json (or a GGUF's metadata read as
    one, or the config a REF.npz carries) implies."""
    try:
        want = header_from_config(config, h.weights_float_type)
    except CheckpointError as e:
        return failed("model.header_vs_config", "-", "-", f"the source config cannot be converted: {e}")
    diffs = [(f.name, getattr(h, f.name), getattr(want, f.name)) for f in fields(ModelHeader)
             if getattr(h, f.name) != getattr(want, f.name)]
    if not diffs:
        return passed("model.header_vs_config", "all fields equal", "equal to config.json")
    text = "; ".join(f"{name} is {_show(got)} in the .m but {_show(exp)} per config.json" for name, got, exp in diffs)
    hint = " (a transformers-5 config keeps it in rope_parameters, which the reference converter drops)" \
        if any(n == "rope_theta" for n, _, _ in diffs) else ""
    return failed("model.header_vs_config", f"{len(diffs)} field(s) differ", "equal to config.json",
                  f"{text}{hint}; reconvert with dllama-convert",
                  differences={n: {"model": _show(g), "config": _show(e)} for n, g, e in diffs})


def _show(v) -> str:
    return v.name.lower() if hasattr(v, "name") else str(v)


def weights_vs_checkpoint(mf: ModelFile, ckpt: Checkpoint, progress=None) -> CheckResult:
    """Sampled rows of every tensor against the checkpoint, permuted as FORMAT.md §1.3 says.
    A mismatch is diagnosed: rows not permuted, or which other tensor the slot really holds."""
    plan = tensor_plan(mf.header)
    tol = WEIGHT_TOLERANCE[mf.header.weights_float_type]
    errors, problems = {}, []
    scales = channel_scales(mf, ckpt, plan)
    for i, spec in enumerate(plan):
        if spec.name in scales:
            continue  # a norm that absorbed channel scales is checked through the matrices after it
        rows = sample_rows(spec)
        stored = stored_rows(mf, spec, rows)
        expected = expected_rows(ckpt, spec, rows)
        if expected is None:
            problems.append(f"{spec.hf_name} is missing from the checkpoint")
            continue
        norm = norm_before(spec)
        if norm in scales:
            stored = stored / scales[norm]
        err = relative_error(stored, expected)
        errors[spec.name] = err
        if err > _tolerance(spec):
            problems.append(f"{spec.name} {diagnose(mf, ckpt, spec, plan, rows, stored)} (relative error {err:.3g})")
        if progress:
            progress(i + 1, len(plan))
    worst = max(errors.values(), default=0.0)
    measured = f"max rel err {worst:.3g}"
    threshold = f"<= {tol:g} ({mf.header.weights_float_type.name.lower()})"
    if problems:
        return failed("model.weights_vs_checkpoint", measured, threshold,
                      "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
                      + "; reconvert with dllama-convert", relative_errors=errors, problems=problems)
    return passed("model.weights_vs_checkpoint", measured, threshold, relative_errors=errors)


# The error-aware q40 encoder scales the input channels of the matrices after an RMSNorm weight and
# divides that weight by the same scales (dllama.converter.calibration.Fold); the original's
# matrices are recovered as stored / (original norm / stored norm).
NORM_OF = {"q": "attn_norm", "k": "attn_norm", "v": "attn_norm", "w1": "ffn_norm", "w3": "ffn_norm",
           "gate": "ffn_norm"}


def norm_before(spec: TensorSpec) -> str | None:
    """Our name of the RMSNorm weight whose output `spec` multiplies, or None."""
    if spec.name == "lm_head":
        return "norm"
    if spec.layer is None:
        return None
    role = spec.name.split(".")[-1]
    return f"layers.{spec.layer}.{NORM_OF[role]}" if role in NORM_OF else None


def channel_scales(mf: ModelFile, ckpt: Checkpoint, plan: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Per folded norm (our name): the channel scales its matrices were stored with (1 where the
    file's norm equals the original's, or both are 0); only norms that differ from the original. A fold
    keeps zeros as zeros: a channel zero in one and not in the other is no fold, and is compared."""
    out = {}
    for spec in plan:
        if not (spec.name == "norm" or spec.name.endswith((".attn_norm", ".ffn_norm"))) or spec.hf_name not in ckpt:
            continue
        original = ckpt.get(spec.hf_name).astype(np.float32)
        stored = stored_rows(mf, spec, np.arange(1))[0]
        if np.any((original == 0) != (stored == 0)):
            continue  # a channel zeroed (or made up) in the file: its values are compared, and fail
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where((original != 0) & (stored != 0), original / stored, np.float32(1)).astype(np.float32)
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            continue  # not a fold: the values themselves are compared, and fail
        if not np.array_equal(s, np.ones_like(s)):
            out[spec.name] = s
    return out


def _tolerance(spec: TensorSpec) -> float:
    return WEIGHT_TOLERANCE[spec.float_type]


def sample_rows(spec: TensorSpec) -> np.ndarray:
    n = spec.shape[0] if len(spec.shape) == 2 else 1
    if n <= 2 * SAMPLE_ROWS:
        return np.arange(n)
    return np.unique(np.concatenate([np.arange(SAMPLE_ROWS), np.linspace(SAMPLE_ROWS, n - 1, SAMPLE_ROWS).astype(int)]))


def stored_rows(mf: ModelFile, spec: TensorSpec, rows: np.ndarray) -> np.ndarray:
    raw = mf.raw(spec.name)
    if len(spec.shape) == 1:
        return decode_tensor(raw, spec.float_type, spec.shape)[None, :]
    picked = np.ascontiguousarray(raw.reshape(spec.shape[0], -1)[rows])
    return decode_tensor(picked, spec.float_type, (len(rows), spec.shape[1]))


def expected_rows(ckpt: Checkpoint, spec: TensorSpec, rows: np.ndarray,
                  permute: bool | None = None) -> np.ndarray | None:
    name = spec.hf_name if spec.hf_name in ckpt else spec.fallback_hf_name
    if name is None or name not in ckpt:
        return None
    w = ckpt.get(name)
    if w.shape != spec.shape:
        return np.full((len(rows), spec.shape[-1]), np.nan, np.float32)  # wrong shape never matches
    if len(spec.shape) == 1:
        return w[None, :]
    heads = spec.permute_heads if permute is None else (_heads_of(ckpt, spec) if permute else None)
    if heads:
        w = permute_rotary_rows(w, heads)
    return w[rows]


def _heads_of(ckpt: Checkpoint, spec: TensorSpec) -> int:
    c = ckpt.config
    n_heads = int(c["num_attention_heads"])
    return n_heads if spec.name.endswith(".q") else int(c.get("num_key_value_heads") or n_heads)


def relative_error(stored: np.ndarray, expected: np.ndarray) -> float:
    if stored.shape != expected.shape or not np.all(np.isfinite(expected)):
        return float("inf")
    scale = float(np.sqrt(np.mean(expected.astype(np.float64) ** 2)))
    diff = float(np.sqrt(np.mean((stored.astype(np.float64) - expected) ** 2)))
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def diagnose(mf: ModelFile, ckpt: Checkpoint, spec: TensorSpec, plan: list[TensorSpec], rows: np.ndarray,
             stored: np.ndarray) -> str:
    if spec.name.endswith((".q", ".k")):
        flipped = expected_rows(ckpt, spec, rows, permute=not spec.permute_heads)
        if flipped is not None and relative_error(stored, flipped) <= _tolerance(spec):
            return ("has q/k rows NOT permuted for rotary pairs (FORMAT.md §1.3)" if spec.permute_heads
                    else f"has q/k rows permuted, but {mf.header.arch.name.lower()} must not be (FORMAT.md §1.3)")
    expected = expected_rows(ckpt, spec, rows)
    if expected is not None and relative_error(stored, bf16_read_as_f16(expected)) <= 2 * _tolerance(spec) + 0.01:
        return "holds the original's bf16 bytes read as f16 (reconvert reading bf16)"
    for other in plan:
        if other is spec or other.shape != spec.shape or not _related(spec, other):
            continue
        candidate = expected_rows(ckpt, other, rows)
        if candidate is not None and relative_error(stored, candidate) <= _tolerance(spec):
            return f"holds {other.hf_name} instead of {spec.hf_name} (tensors swapped)"
    return f"differs from {spec.hf_name}"


def bf16_read_as_f16(values: np.ndarray) -> np.ndarray:
    """The values a converter gets when it reads these values' bf16 bytes as f16."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    bf16 = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # bf16 rounding: nearest even
    return bf16.view(np.float16).astype(np.float32)


def _related(a: TensorSpec, b: TensorSpec) -> bool:
    """Same layer (w1/w3 swapped) or same role in another layer (layers swapped)."""
    role = lambda s: s.name.split(".", 2)[-1] if s.layer is not None else s.name  # noqa: E731
    return a.layer == b.layer or role(a) == role(b)


# --------------------------------------------------------------------------------------------
# Tokenizer structure

def vocab_sizes_equal(h: ModelHeader, tf: TokenizerFile) -> CheckResult:
    measured = f".m {h.vocab_size}, .t {tf.vocab_size}"
    if h.vocab_size == tf.vocab_size:
        return passed("tokenizer.vocab_size", measured, "equal")
    diff = tf.vocab_size - h.vocab_size
    if diff < -1 and padded_vocabulary(h.vocab_size, tf.vocab_size):
        return warned("tokenizer.vocab_size", measured, "equal",
                      f"the model's embedding has {-diff} rows the tokenizer never produces: fine for a checkpoint "
                      "that pads its vocabulary (Qwen does); otherwise the tokenizer lost tokens")
    if abs(diff) == 1:
        why = (f"the vocabularies differ by one token (an added or dropped special token?): the .t has "
               f"{'one more' if diff > 0 else 'one fewer'}; convert the tokenizer from the same model folder")
    elif abs(diff) > max(64, h.vocab_size // 50):
        why = "this tokenizer belongs to another model; convert the tokenizer from the model's own folder"
    else:
        why = (f"the vocabularies differ by {abs(diff)} tokens (padding or added tokens?); convert both from the "
               "same model folder")
    return failed("tokenizer.vocab_size", measured, "equal", why)


def special_ids(tf: TokenizerFile, expected_bos: int | None, expected_eos: list[int] | None) -> CheckResult:
    """bos/eos in range (parse_tokenizer already refuses out-of-range ids) and equal to the source's."""
    measured = f"bos {tf.bos_id}, eos {tf.eos_ids}"
    if not tf.eos_ids:
        return failed("tokenizer.special_ids", measured, "eos present",
                      "the .t lists no eos token, so generation never stops; reconvert")
    if expected_bos is None:
        return passed("tokenizer.special_ids", measured, "in range (no source to compare)")
    threshold = f"bos {expected_bos}, eos {expected_eos}"
    if tf.bos_id == expected_bos and list(tf.eos_ids) == list(expected_eos or []):
        return passed("tokenizer.special_ids", measured, threshold)
    if tf.bos_id in (expected_eos or []) and expected_bos in tf.eos_ids:
        why = f"bos and eos are swapped: bos_id {tf.bos_id} is {_tok(tf, tf.bos_id)}, the source's eos"
    else:
        why = f"bos/eos ids differ from the source's (bos {_tok(tf, tf.bos_id)}, expected {_tok(tf, expected_bos)})"
    return failed("tokenizer.special_ids", measured, threshold, why + "; reconvert the tokenizer")


def _tok(tf: TokenizerFile, i: int | None) -> str:
    if i is None or not 0 <= i < tf.vocab_size:
        return str(i)
    return f"{i} {tf.tokens[i].decode('utf-8', 'replace')!r}"


def expected_special_ids_from_embedded(tf: TokenizerFile) -> tuple[int | None, list[int] | None]:
    """bos/eos as the embedded tokenizer_config names them, looked up by their text in the .t."""
    config = embedded_config(tf)  # {} when absent or unreadable
    if not config:
        return None, None
    by_bytes = {t: i for i, t in enumerate(tf.tokens)}

    def lookup(key: str) -> int | None:
        value = config.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        return by_bytes.get(text.encode("utf-8")) if isinstance(text, str) else None

    bos, eos = lookup("bos_token"), lookup("eos_token")
    if bos is None or eos is None:
        return None, None
    return bos, [eos] if eos not in tf.eos_ids else tf.eos_ids  # config names one eos; the .t may list more


def tokenizer_vs_source(tf: TokenizerFile, source: TokenizerFile) -> CheckResult:
    if tf.vocab_size != source.vocab_size:
        return failed("tokenizer.vs_source", f"{tf.vocab_size} vs {source.vocab_size} tokens", "identical tokens",
                      f"the .t has {tf.vocab_size} tokens, the source tokenizer {source.vocab_size}: it was converted "
                      "from another tokenizer")
    differing = [i for i, (a, b) in enumerate(zip(tf.tokens, source.tokens)) if a != b]
    if not differing:
        return passed("tokenizer.vs_source", f"{tf.vocab_size} tokens identical", "identical tokens")
    shown = ", ".join(f"id {i}: {tf.tokens[i]!r} vs {source.tokens[i]!r}" for i in differing[:3])
    return failed("tokenizer.vs_source", f"{len(differing)} tokens differ", "identical tokens",
                  f"{shown}: the .t's vocabulary is not the source's; convert the tokenizer from the model's folder",
                  differing_ids=differing[:100])


_LITERAL_BYTE_PIECE = re.compile(rb"^<0x[0-9A-Fa-f]{2}>$")


def byte_fallback(tf: TokenizerFile, source_has_byte_fallback: bool | None) -> CheckResult:
    """A byte-fallback sentencepiece vocabulary must store its <0xNN> pieces as the byte NN (FORMAT.md §4)."""
    literal = [i for i, t in enumerate(tf.tokens) if _LITERAL_BYTE_PIECE.match(t)]
    if literal:
        return failed("tokenizer.byte_fallback", f"{len(literal)} literal <0xNN> pieces", "0",
                      f"byte-fallback pieces are stored as text (id {literal[0]} is {tf.tokens[literal[0]]!r}, not one "
                      "byte): "
                      "the tokenizer was converted without byte fallback, so characters outside the vocabulary "
                      "would come out as '<0x..>' text; reconvert with dllama-convert")
    if source_has_byte_fallback is None:
        return passed("tokenizer.byte_fallback", "0 literal <0xNN> pieces", "0")
    single = {t[0] for t in tf.tokens if len(t) == 1}
    missing = 256 - len(single)
    if source_has_byte_fallback and missing:
        return failed("tokenizer.byte_fallback", f"{missing} of 256 bytes missing", "all 256 bytes",
                      f"the source tokenizer uses byte fallback but {missing} byte values have no single-byte token; "
                      "reconvert")
    return passed("tokenizer.byte_fallback", "0 literal <0xNN> pieces", "0")


def chat_template(render, template: str | None) -> CheckResult:
    """`render(messages) -> str` is the tokenizer's own renderer (dllama.tokenizer)."""
    if not template:
        return warned("tokenizer.chat_template", "none", "renders",
                      "the .t has no chat template: chat mode will need one (base models have none; fine for "
                      "completion)")
    try:
        text = render([{"role": "user", "content": "Hello"},
                       {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Bye"}])
    except Exception as e:  # jinja2 raises many kinds; any of them means the template is unusable
        return failed("tokenizer.chat_template", "error", "renders",
                      f"the chat template does not render: {type(e).__name__}: {e}")
    if "Hello" not in text or "Bye" not in text:
        return failed("tokenizer.chat_template", f"{len(text)} chars", "renders the messages",
                      "the chat template rendered without the messages' text")
    return passed("tokenizer.chat_template", f"{len(text)} chars", "renders", sample=text[:200])
