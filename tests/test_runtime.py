"""The runtime's forward pass against Hugging Face logits (f32) and a plain numpy model of the
quantized arithmetic (q40/q80), for llama, qwen3 and qwen3_moe (FORMAT.md §2, §3)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFORMANCE, require_fixtures

from dllama.converter.synthetic import write_random_model
from dllama.formats import (
    ArchType,
    FloatType,
    ModelFile,
    ModelHeader,
    RopeType,
    dequantize_q80,
    quantize_q80,
)
from dllama.runtime import dispatch
from dllama.runtime.engine import Engine, EngineError, LocalExchange
from dllama.runtime.generate import generate
from dllama.runtime.model import (
    NodeLayers,
    load_node_weights,
    rmsnorm,
    rope_frequencies,
)
from dllama.runtime.split import ClusterSplit


def reference_logits(folder: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    data = np.load(folder / "reference_logits.npz")
    n = sum(1 for k in data.files if k.startswith("logits"))
    return [(data[f"ids{j}"], data[f"logits{j}"], data[f"greedy{j}"]) for j in range(n)]


# --------------------------------------------------------------------------------------------
# A plain numpy model of FORMAT.md §2: weights decoded with the format's codecs, activations
# passed through the reference q80 quantizer, one token at a time. Stages compute in float64 and
# round to float32 where the runtime does (matmul outputs, norms, rope, attention, residual). On
# every model below the runtime's logits agree with it to <= 1.8e-6 (measured), so no q80
# rounding flips between the two.

def decode_weights(m: ModelFile, name: str) -> np.ndarray:
    """A tensor's values from its stored blocks, written from FORMAT.md §1.2 alone (not the codecs)."""
    float_type = m.layout[name].spec.float_type
    if float_type not in (FloatType.Q40, FloatType.Q80):
        return m.tensor(name).astype(np.float64)
    blocks = m.blocks(name)
    d = blocks["d"].astype(np.float64)[..., None]
    qs = blocks["qs"].astype(np.int64)
    if float_type == FloatType.Q40:  # low nibbles are values 0-15, high nibbles 16-31
        qs = np.concatenate([qs & 0x0F, qs >> 4], axis=-1) - 8
    return (qs * d).reshape(m.layout[name].spec.shape)


def q80_round_trip(x: np.ndarray) -> np.ndarray:
    """The reference q80 quantizer and back (FORMAT.md §1.2), per 32-value block."""
    blocks = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / np.float32(127)
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.rint(blocks * inverse[:, None]).astype(np.float64)  # rint: half to even
    return (q * d.astype(np.float16).astype(np.float64)[:, None]).reshape(-1)


class NumpyModel:
    def __init__(self, path: Path):
        self.m = ModelFile(path)
        self.h = self.m.header
        self.q80 = self.h.weights_float_type in (FloatType.Q40, FloatType.Q80)
        self.w = {name: decode_weights(self.m, name) for name in self.m.names}
        self.cache: list[tuple[list, list]] = [([], []) for _ in range(self.h.n_layers)]

    def partial(self, x: np.ndarray) -> np.ndarray:
        """A layer's output as it is added to the float32 residual: one node rounds it through
        nothing (the reference's q80 round trip is --buffer-float-type q80, tested below)."""
        return np.asarray(x, dtype=np.float32)

    def quant(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return q80_round_trip(x) if self.q80 else x.astype(np.float64)

    def mm(self, name: str, x: np.ndarray) -> np.ndarray:
        # numpy's float64 product, in no particular order: it shares nothing with the kernels' float32
        # lanes, so a kernel that drops a block or mis-scales one is seen, not mirrored
        return (self.w[name] @ self.quant(x)).astype(np.float32)

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return (x / np.sqrt(np.mean(x * x) + self.h.norm_epsilon) * weight).astype(np.float32)

    def rope(self, x: np.ndarray, pos: int) -> np.ndarray:
        hd = self.h.head_dim
        freqs = np.array([self.h.theta ** (-2 * i / hd) for i in range(hd // 2)])
        if self.h.effective_rope_type == RopeType.LLAMA3_1:
            freqs = np.array([llama31_scale(f, self.h) for f in freqs])
        out = x.astype(np.float64).copy()
        for head in out.reshape(-1, hd):
            for i, f in enumerate(freqs):
                a, b = (i, i + hd // 2) if self.h.effective_rope_type == RopeType.FALCON else (2 * i, 2 * i + 1)
                c, s = math.cos(pos * f), math.sin(pos * f)
                head[a], head[b] = head[a] * c - head[b] * s, head[a] * s + head[b] * c
        return out.astype(np.float32)

    def token(self, token: int, pos: int) -> np.ndarray:
        h, hd = self.h, self.h.head_dim
        x = self.w["embedding"][token].astype(np.float32)
        for layer in range(h.n_layers):
            p = f"layers.{layer}."
            y = self.rmsnorm(x, self.w[p + "attn_norm"])
            q = self.mm(p + "q", y).reshape(h.n_heads, hd)
            k = self.mm(p + "k", y).reshape(h.n_kv_heads, hd)
            v = self.mm(p + "v", y).reshape(h.n_kv_heads, hd)
            if h.has_qk_norm:
                q = np.stack([self.rmsnorm(qh, self.w[p + "q_norm"]) for qh in q])
                k = np.stack([self.rmsnorm(kh, self.w[p + "k_norm"]) for kh in k])
            keys, values = self.cache[layer]
            keys.append(self.rope(k, pos))
            values.append(v)
            q = self.rope(q, pos).astype(np.float64)
            z = np.zeros((h.n_heads, hd))
            for head in range(h.n_heads):
                kv = head // (h.n_heads // h.n_kv_heads)
                scores = np.array([q[head] @ kk[kv].astype(np.float64) / math.sqrt(hd) for kk in keys])
                a = np.exp(scores - scores.max())
                a /= a.sum()
                z[head] = sum(a_t * vv[kv].astype(np.float64) for a_t, vv in zip(a, values))
            x = x + self.partial(self.mm(p + "wo", z.reshape(-1)))
            y = self.rmsnorm(x, self.w[p + "ffn_norm"])
            x = x + self.partial(self.moe(p, y) if h.is_moe else self.ffn(p, y))
        return self.mm("lm_head", self.rmsnorm(x, self.w["norm"]))

    def ffn(self, p: str, y: np.ndarray) -> np.ndarray:
        a = self.mm(p + "w1", y)
        hidden = a / (1 + np.exp(-a.astype(np.float64))) * self.mm(p + "w3", y)
        return self.mm(p + "w2", hidden)

    def moe(self, p: str, y: np.ndarray) -> np.ndarray:
        g = self.w[p + "gate"] @ y.astype(np.float64)
        g = np.exp(g - g.max()) / np.exp(g - g.max()).sum()
        top = np.argsort(-g, kind="stable")[:self.h.n_active_experts]
        weights = g[top] / g[top].sum()
        return sum(wt * self.ffn(f"{p}experts.{e}.", y) for e, wt in zip(top, weights)).astype(np.float32)

    def logits(self, ids) -> np.ndarray:
        return np.stack([self.token(int(t), pos) for pos, t in enumerate(ids)])


# Measured: <= 1.8e-6 against NumpyModel (q40, q80, f32; llama, qwen3, moe, llama3.1 rope) and
# <= 2.2e-6 against transformers' f32 logits. 10x that still catches a wrong RMSNorm epsilon
# (1e-5 for 1e-6 moves these logits by 1.5e-3 to 3.6e-3), one dropped q40 block, or a rope off by
# one position.
LOGITS_TOLERANCE = 2e-5


def assert_matches_quantized_arithmetic(got: np.ndarray, expected: np.ndarray) -> None:
    assert np.abs(got - expected).max() <= LOGITS_TOLERANCE
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def llama31_scale(f: float, h: ModelHeader) -> float:
    factor, low, high = h.rope_scaling_factor, h.rope_scaling_low_freq_factor, h.rope_scaling_high_freq_factor
    orig = h.rope_scaling_orig_max_seq_len
    wavelen = 2 * math.pi / f
    if wavelen < orig / high:
        return f
    if wavelen > orig / low:
        return f / factor
    smooth = (orig / wavelen - low) / (high - low)
    return (1 - smooth) * f / factor + smooth * f


def moe_header(float_type: FloatType) -> ModelHeader:
    return ModelHeader(arch=ArchType.QWEN3_MOE, dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2,
                       vocab_size=96, max_seq_len=128, weights_float_type=float_type, n_experts=4, n_active_experts=2,
                       rope_theta=1000000, head_dim_value=32, norm_epsilon_code=6, moe_hidden_dim=64)


def llama31_header(float_type: FloatType) -> ModelHeader:
    # orig 16 positions so the scaling changes frequencies that matter within a short prompt
    return ModelHeader(arch=ArchType.LLAMA, dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                       vocab_size=96, max_seq_len=128, weights_float_type=float_type, rope_theta=500000,
                       rope_scaling_factor=8, rope_scaling_low_freq_factor=1, rope_scaling_high_freq_factor=4,
                       rope_scaling_orig_max_seq_len=16, rope_type=RopeType.LLAMA3_1)


PROMPT = [1, 17, 42, 5, 88, 3, 9, 60, 31, 2, 77, 14]


# --------------------------------------------------------------------------------------------
# f32: Hugging Face logits and greedy continuations

def test_f32_logits_match_hugging_face_at_every_position(conformance_dir):
    engine = Engine.load(conformance_dir / "expected_f32.m")
    for ids, expected, _ in reference_logits(conformance_dir):
        engine.reset()
        got = engine.forward(ids.tolist(), 0)
        assert_matches_quantized_arithmetic(got, expected)


def test_f32_greedy_generation_reproduces_hugging_face(conformance_dir):
    engine = Engine.load(conformance_dir / "expected_f32.m")
    for ids, _, greedy in reference_logits(conformance_dir):
        engine.reset()
        assert list(generate(engine, ids.tolist(), len(greedy), temperature=0.0)) == greedy.tolist()


# --------------------------------------------------------------------------------------------
# q40/q80: the numpy model of the same quantized arithmetic

@pytest.mark.parametrize("float_type", ["q40", "q80"])
def test_quantized_fixture_logits_match_numpy_arithmetic(conformance_dir, float_type):
    path = conformance_dir / f"expected_{float_type}.m"
    ids = reference_logits(conformance_dir)[0][0].tolist()
    got = Engine.load(path).forward(ids, 0)
    assert_matches_quantized_arithmetic(got, NumpyModel(path).logits(ids))


@pytest.mark.parametrize("float_type", [FloatType.Q40, FloatType.F32])
def test_qwen3_moe_matches_numpy_arithmetic(tmp_path, float_type):
    path = write_random_model(tmp_path / "moe.m", moe_header(float_type))
    got = Engine.load(path).forward(PROMPT, 0)
    expected = NumpyModel(path).logits(PROMPT)
    assert_matches_quantized_arithmetic(got, expected)
    assert np.abs(expected).max() > 0.1  # the comparison is not between two near-zero outputs


@pytest.mark.parametrize("float_type", [FloatType.Q80, FloatType.F32])
def test_llama31_rope_scaling_matches_numpy_arithmetic(tmp_path, float_type):
    path = write_random_model(tmp_path / "llama31.m", llama31_header(float_type))
    got = Engine.load(path).forward(PROMPT, 0)
    assert_matches_quantized_arithmetic(got, NumpyModel(path).logits(PROMPT))


# Llama 3.1's factors, and a low factor of 2 with a wavelength (32.5) between orig / low and orig * low
@pytest.mark.parametrize("low, high, orig", [(1.0, 4.0, 16), (2.0, 6.0, 64)])
def test_llama31_frequencies_match_the_hugging_face_formula(low, high, orig):
    from dllama.validate.reference import rope_frequencies as hf_frequencies

    h = dataclasses.replace(llama31_header(FloatType.F32), rope_scaling_low_freq_factor=low,
                            rope_scaling_high_freq_factor=high, rope_scaling_orig_max_seq_len=orig)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": orig}
    config = {"rope_theta": 500000.0, "rope_scaling": scaling}
    ours = rope_frequencies(h)
    assert np.allclose(ours, hf_frequencies(config, h.head_dim), rtol=1e-12)
    assert not np.allclose(ours, 500000.0 ** (-np.arange(0, 16, 2) / 16))  # scaling did something


# --------------------------------------------------------------------------------------------
# Batches, positions, the tensor-parallel seams

@pytest.mark.parametrize("float_type", ["f32", "q40"])
def test_batched_prefill_equals_token_by_token(float_type):
    path = require_fixtures(CONFORMANCE / "tiny-qwen3") / f"expected_{float_type}.m"
    engine = Engine.load(path)
    batched = engine.forward(PROMPT, 0)
    engine.reset()
    stepwise = np.concatenate([engine.forward([t], i) for i, t in enumerate(PROMPT)])
    # measured 0 here; a CPU whose batched kernel sums in another order may differ by float32 rounding
    assert np.abs(batched - stepwise).max() <= LOGITS_TOLERANCE


def test_prompts_longer_than_a_batch_are_split_without_changing_the_result(monkeypatch):
    from dllama.runtime import engine as engine_module

    path = require_fixtures(CONFORMANCE / "tiny-llama") / "expected_q40.m"
    whole = Engine.load(path).forward(PROMPT, 0)
    monkeypatch.setattr(engine_module, "PREFILL_BATCH", 5)
    assert np.array_equal(Engine.load(path).forward(PROMPT, 0), whole)


@pytest.mark.parametrize("compiled", [True, False])
def test_a_prompts_last_logits_alone_equal_the_last_row_of_all(compiled):
    """generate() asks for the prompt's last logits only: one node then skips the other tokens'
    lm_head, in every batch of a long prompt; the row it gives is the full run's last, bit for bit."""
    path = require_fixtures(CONFORMANCE / "tiny-llama") / "expected_q40.m"
    prompt = PROMPT * 6  # 72 tokens: two batches
    engine = Engine.load(path) if compiled else per_call_engine(path)
    everything = engine.forward(prompt, 0)
    engine.reset()
    last = engine.forward(prompt, 0, last_only=True)
    assert last.shape == (1, everything.shape[1]) and np.array_equal(last[0], everything[-1])
    fresh = Engine.load(path).forward(prompt + PROMPT[:3], 0)
    assert np.array_equal(engine.forward(PROMPT[:3], len(prompt)), fresh[-3:])  # the cache is whole


def resident_pages(address: int, nbytes: int) -> int:
    """Pages of this process's memory in [address, address + nbytes) that are mapped in (/proc/self/pagemap)."""
    first, last = address // 4096, (address + nbytes - 1) // 4096
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first + 1) * 8), dtype="<u8")
    return int(np.count_nonzero(entries >> np.uint64(63)))


LARGEST_FOLIO = 2 << 20  # a PMD: what mapping a tensor beside the embedding can map of its pages at either end


def test_looking_up_tokens_maps_no_page_of_the_embedding(tmp_path):
    """Rows are read from the file (ModelFile.rows): through the map, Linux 6 maps the page cache's whole large
    folio around a touched row, and a few hundred tokens made all of TinyLlama's embedding resident. Mapping
    the tensors beside it (at load, or under qemu-user, whose madvise does nothing, in the first forward) may
    map up to a folio of its pages at either end, so only the pages between are counted."""
    header = ModelFile(require_fixtures(CONFORMANCE / "tiny-llama") / "expected_q40.m").header
    engine = Engine.load(write_random_model(tmp_path / "wide_vocab.m", dataclasses.replace(header, vocab_size=65536)))
    embedding = engine.model.layout["embedding"]  # 16 MiB, 16 rows per page
    start, nbytes = engine.model.data.ctypes.data + embedding.offset, embedding.spec.nbytes
    interior = (start + LARGEST_FOLIO, nbytes - 2 * LARGEST_FOLIO)
    engine.forward([1, 16000, 32000, 48000], 0)  # rows 4 MiB and more from either end
    engine.forward([40000], 4)
    assert resident_pages(*interior) == 0


@pytest.mark.parametrize("logits", ["all", "last"])
def test_a_whole_pass_longer_than_a_batch_gives_every_batchs_logits(logits):
    """CompiledPass.whole runs a longer input a batch at a time; each batch's logits are kept, not the
    buffer the next batch overwrites."""
    path = require_fixtures(CONFORMANCE / "tiny-llama") / "expected_q40.m"
    prompt = PROMPT * 12  # 144 tokens: three batches
    engine = Engine.load(path)
    if engine.layers.compiled() is None:
        pytest.skip("the JIT kernels run the per-call blocks only")
    x = np.array(engine.embedding[prompt], dtype=np.float32)
    got = engine.layers.compiled().whole(x, 0, None, logits)
    want = Engine.load(path).forward(prompt, 0)
    assert np.array_equal(got, want if logits == "all" else want[-1:])


def test_continuing_from_a_cached_prefix_equals_a_fresh_run():
    path = require_fixtures(CONFORMANCE / "tiny-llama") / "expected_q40.m"
    engine = Engine.load(path)
    fresh = engine.forward(PROMPT, 0)
    engine.reset()
    engine.forward(PROMPT[:5], 0)
    rest = engine.forward(PROMPT[5:], 5)
    assert np.array_equal(rest, fresh[5:])


def test_two_node_slices_sum_to_the_single_node_result():
    path = require_fixtures(CONFORMANCE / "tiny-llama") / "expected_f32.m"
    model = ModelFile(path)
    h = model.header
    shares = ClusterSplit.plan(h, 2).nodes
    nodes = [NodeLayers(h, load_node_weights(model, s), s, 64) for s in shares]
    x = model.tensor("embedding")[PROMPT].astype(np.float32)
    for layer in range(h.n_layers):
        lw = nodes[0].w.layers[layer]
        y = rmsnorm(x, lw.attn_norm, h.norm_epsilon)
        x = x + sum(node.attention(layer, y, 0) for node in nodes)
        y = rmsnorm(x, lw.ffn_norm, h.norm_epsilon)
        x = x + sum(node.ffn(layer, y) for node in nodes)
    logits = np.concatenate([node.logits(x) for node in nodes], axis=1)
    assert nodes[0].k_cache.shape[2] == h.n_kv_heads // 2
    # measured 9.2e-7: two nodes' partials summed in numpy's order against the engine's
    assert np.abs(logits - Engine.load(path).forward(PROMPT, 0)).max() <= LOGITS_TOLERANCE


def per_call_engine(path, **kwargs) -> Engine:
    """An engine that runs the per-call blocks (one kernel call per operation), not the compiled programs."""
    engine = Engine.load(path, **kwargs)
    engine.layers._compiled = None
    return engine


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("float_type", ["q40", "q80", "f32"])
def test_the_compiled_pass_gives_the_per_call_blocks_bits(float_type, threads):
    from dllama.runtime import dispatch

    if not dispatch.runs_programs():
        pytest.skip("the JIT kernels run the per-call blocks only")
    path = require_fixtures(CONFORMANCE / "tiny-llama") / f"expected_{float_type}.m"
    compiled, per_call = Engine.load(path, nthreads=threads), per_call_engine(path, nthreads=threads)
    assert compiled.layers.compiled() is not None
    prompt = PROMPT * 4  # 48 tokens: six groups of attention's ATTENTION_DEAL tokens, dealt out to the threads
    for engine in (compiled, per_call):
        engine.out = [engine.forward(prompt, 0)]
        engine.out += [engine.forward([t], len(prompt) + i) for i, t in enumerate(PROMPT[:4])]
    for a, b in zip(compiled.out, per_call.out):
        assert np.array_equal(a, b)


def test_loading_builds_the_programs_every_generation_runs():
    """A first prompt does not wait for the decode program or a full prompt batch's program: both are
    built, tables and all, when the model loads; a prompt's shorter last batch is built when it comes."""
    from dllama.runtime import dispatch

    if not dispatch.runs_programs():
        pytest.skip("the JIT kernels run the per-call blocks only")
    engine = Engine.load(require_fixtures(CONFORMANCE / "tiny-llama") / "expected_q40.m")
    programs = engine.layers.compiled().programs
    assert set(programs) == {(1, True, "all"), (64, True, "none")}
    assert all(p.ops is not None for p in programs.values())
    engine.forward(PROMPT * 6, 0, last_only=True)  # 72 tokens: a batch of 64, then 8 with the last one's logits
    assert set(programs) == {(1, True, "all"), (64, True, "none"), (8, True, "last")}


def test_compiled_stretches_give_the_per_call_partials_bits():
    """A node of a cluster runs each stretch between two exchange points as one compiled call."""
    from dllama.runtime import dispatch

    if not dispatch.runs_programs():
        pytest.skip("the JIT kernels run the per-call blocks only")
    path = require_fixtures(CONFORMANCE / "tiny-llama") / "expected_q40.m"
    model = ModelFile(path)
    h = model.header
    x = model.tensor("embedding")[PROMPT].astype(np.float32)
    share = ClusterSplit.plan(h, 2).nodes[1]
    weights = load_node_weights(model, share)
    for lw in weights.layers:  # the column slices as a worker holds them: received, contiguous
        lw.wo, lw.w2 = (dataclasses.replace(m, data=np.ascontiguousarray(m.data)) for m in (lw.wo, lw.w2))
    compiled, per_call = (NodeLayers(h, weights, share, 64) for _ in range(2))
    per_call._compiled = None
    partials = [[node.attention_block(0, x, 0), node.ffn_block(0, x), node.logits(x)] for node in (compiled, per_call)]
    assert compiled.compiled() is not None
    for a, b in zip(*partials):
        assert np.array_equal(a, b)
    many = np.repeat(x, 7, axis=0)  # more tokens than a program's batch (the validator's logits of whole prompts)
    assert np.array_equal(compiled.logits(many), per_call.logits(many))


def test_q80_partials_are_quantized_on_a_single_node():
    exchange = LocalExchange(quantize_partials=True)
    x = np.zeros((1, 64), dtype=np.float32)
    partial = np.linspace(-1, 1, 64, dtype=np.float32)[None, :] * np.float32(0.37)
    expected = dequantize_q80(quantize_q80(partial))
    exchange.reduce_into(x, partial.copy(), 0, "attention")
    assert np.array_equal(x[0], expected)


class StretchByStretch(LocalExchange):
    """LocalExchange through the per-stretch path: each partial comes back to Python, reduce_into rounds it."""
    adds_partials_as_computed = False


@pytest.mark.parametrize("quant", ["q40", "q80"])
def test_q80_partials_on_one_node_run_in_the_whole_pass_with_the_exchanges_bits(quant):
    """--buffer-float-type q80 on one node rounds each partial inside the compiled whole pass (one call per
    token, issue 24), to the bits of LocalExchange.reduce_into's rounding between stretches."""
    path = require_fixtures(CONFORMANCE / "tiny-llama") / f"expected_{quant}.m"
    whole, by_stretch = (Engine.load(path, max_seq_len=64, nthreads=2, buffer_float_type="q80") for _ in range(2))
    by_stretch.exchange = StretchByStretch(quantize_partials=True)
    assert np.array_equal(whole.forward(PROMPT, 0), by_stretch.forward(PROMPT, 0))
    for pos in range(len(PROMPT), len(PROMPT) + 3):
        assert np.array_equal(whole.forward([PROMPT[pos % 5]], pos), by_stretch.forward([PROMPT[pos % 5]], pos))
    programs = whole.layers.compiled().programs
    assert (1, dispatch.ADD_Q80, "all") in programs and (len(PROMPT), dispatch.ADD_Q80, "all") in programs
    plain = Engine.load(path, max_seq_len=64, nthreads=2)
    assert not np.array_equal(plain.forward(PROMPT, 0), whole.forward(PROMPT, 0))


# --------------------------------------------------------------------------------------------
# Engine errors

def test_forward_past_the_kv_cache_is_refused():
    engine = Engine.load(require_fixtures(CONFORMANCE / "tiny-llama") / "expected_f32.m", max_seq_len=8)
    with pytest.raises(EngineError, match="do not fit the KV cache of 8 positions"):
        engine.forward(list(range(9)), 0)


def test_forward_with_a_gap_in_positions_is_refused():
    engine = Engine.load(require_fixtures(CONFORMANCE / "tiny-llama") / "expected_f32.m")
    engine.forward([1, 2], 0)
    with pytest.raises(EngineError, match="past the 2 tokens"):
        engine.forward([3], 5)


def test_max_seq_len_is_capped_at_the_models_limit():
    engine = Engine.load(require_fixtures(CONFORMANCE / "tiny-llama") / "expected_f32.m", max_seq_len=100000)
    assert engine.max_seq_len == engine.header.max_seq_len


def test_f16_weights_are_refused_with_the_fix(tmp_path):
    from dllama.formats import FormatError

    path = write_random_model(tmp_path / "f16.m", llama31_header(FloatType.F16))
    with pytest.raises(FormatError, match="reconvert with dllama-convert --quant q40, q80 or f32"):
        Engine.load(path)


@pytest.mark.slow
def test_portable_kernels_compute_the_same_bits_as_the_cpus_dot_products(tmp_path):
    """The generic LLVM vector path (Pi 3B+/4, x86 without VNNI) gives the logits of this CPU's
    dot-product path (AVX512-VNNI vpdpbusd, aarch64 sdot) bit for bit."""
    import os
    import subprocess
    import sys

    from dllama.runtime import dispatch

    if dispatch.kernel_path() == "portable":
        pytest.skip("this CPU's kernels are the portable path: there is no dot-product path to compare")
    path = require_fixtures(CONFORMANCE / "tiny-qwen3") / "expected_q40.m"
    script = ("import sys, numpy as np; from dllama.runtime.engine import Engine; from dllama.runtime import dispatch; "
              f"logits = Engine.load({str(path)!r}).forward({PROMPT}, 0); assert dispatch.kernel_path() == 'portable'; "
              "np.save(sys.argv[1], logits)")
    env = dict(os.environ, DLLAMA_NO_VNNI="1", DLLAMA_NO_DOTPROD="1", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.npy")], env=env, check=True)
    assert np.array_equal(np.load(tmp_path / "out.npy"), Engine.load(path).forward(PROMPT, 0))
