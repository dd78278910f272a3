"""The compiled kernels (aot_kernels.py) against numba's JIT kernels: same bits, any thread count, and a
runtime process that never loads numba (issue 6, memory)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from distributed_helpers import write_random_model

from dllama.formats import FloatType, dequantize_q80, quantize_q40, quantize_q80
from dllama.runtime import aot_kernels, cpu, dispatch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def both():
    module = aot_kernels.load()
    if module is None:
        pytest.skip("the compiled kernels cannot be built here (no C compiler or Python headers)")
    return dispatch.JitKernels(), dispatch.CompiledKernels(module)


def quantized_input(rng, T: int, n: int):
    x = (rng.standard_normal((T, n)) * rng.uniform(0.1, 3, size=(T, 1))).astype(np.float32)
    xq, xd, xc = np.empty((T, n), np.int8), np.empty((T, n // 32), np.float32), np.empty((T, n // 32), np.int32)
    dispatch.JitKernels().quantize_q80(x, xq, xd, xc)
    return x, xq, xd, xc


def packed(quantize, rng, rows: int, n: int) -> np.ndarray:
    """Random rows in the kernels' layout (dispatch.interleave_q40, interleave_q80)."""
    return interleaved(stored(quantize, rng, rows, n), quantize)


def interleaved(w: np.ndarray, quantize) -> np.ndarray:
    return dispatch.interleave_q40(w) if quantize is quantize_q40 else dispatch.interleave_q80(w)


def stored(quantize, rng, rows: int, n: int) -> np.ndarray:
    return quantize(rng.standard_normal((rows, n)).astype(np.float32)).reshape(rows, -1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T, rows, n", [(1, 300, 256), (1, 64, 96), (5, 203, 160), (12, 64, 2048)])
def test_matmuls_and_quantizer_are_bit_identical(both, threads, T, rows, n):
    jit, compiled = both
    dispatch.set_threads(threads)
    rng = np.random.default_rng(T * rows + n)
    x, xq, xd, xc = quantized_input(rng, T, n)
    got = [np.empty_like(a) for a in (xq, xd, xc)]
    compiled.quantize_q80(x, *got)
    for want, have in zip((xq, xd, xc), got):
        assert np.array_equal(want, have)
    for quantize, name in ((quantize_q40, "matmul_q40"), (quantize_q80, "matmul_q80")):
        w = packed(quantize, rng, rows, n)
        want, have = np.empty((T, rows), np.float32), np.full((T, rows), np.nan, np.float32)
        getattr(jit, name)(w, xq, xd, xc, want)
        getattr(compiled, name)(w, xq, xd, xc, have)
        assert np.array_equal(want, have), name
        assert np.abs(want).max() > 0
    nf = n + 5  # f32 rows need not fill whole 16-value lanes: a scalar tail too
    w = rng.standard_normal((rows, nf + 7)).astype(np.float32)[:, :nf]  # strided, as a column slice is
    xf = rng.standard_normal((T, nf)).astype(np.float32)
    want, have = np.empty((T, rows), np.float32), np.full((T, rows), np.nan, np.float32)
    jit.matmul_f32(w, xf, want)
    compiled.matmul_f32(w, xf, have)
    assert np.array_equal(want, have), "matmul_f32"
    for t in range(T):  # 4 tokens at a time, or 1: the same bits
        one = np.empty((1, rows), np.float32)
        compiled.matmul_f32(w, xf[t:t + 1], one)
        assert np.array_equal(one[0], have[t])
    assert np.allclose(want, xf.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4 * np.sqrt(nf))
    if T == 1:
        w = packed(quantize_q40, rng, rows, n)
        want, have = np.empty(rows, np.float32), np.full(rows, np.nan, np.float32)
        jit.matvec_q40(w, xq[0], xd[0], xc[0], want)
        compiled.matvec_q40(w, xq[0], xd[0], xc[0], have)
        assert np.array_equal(want, have)


def test_the_q80_wire_kernels_give_the_formats_bytes_and_values(both):
    """Partials cross the network as q80 blocks: the compiled encoder writes formats.quantize_q80's bytes
    (zero blocks, large values, f16-subnormal scales included) and the decoder reads dequantize_q80's values."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 256)) * np.array([[1e-6], [1.0], [3e3]])).astype(np.float32)
    x[0, :32] = 0.0
    want = quantize_q80(x)
    for kernels in both:
        wire, back = np.empty_like(want), np.empty_like(x)
        kernels.q80_encode(x, wire)
        kernels.q80_decode(np.frombuffer(bytes(wire), dtype=np.uint8), back)  # a received payload is read-only
        assert np.array_equal(wire, want)
        assert np.array_equal(back, dequantize_q80(want).reshape(x.shape))


def block_order_reference(w_values, w_scales, xq, xd) -> np.ndarray:
    """out (T, rows) as every q40 and q80 matmul sums it, in numpy float32 (no fused adds): per block b, in
    order, total += f32(the block's exact integer sum of products) * f32(d_w * d_x)."""
    rows, n = w_values.shape
    T, nb = xd.shape
    sums = np.einsum("rbj,tbj->trb", w_values.reshape(rows, nb, 32).astype(np.int32),
                     xq.reshape(T, nb, 32).astype(np.int32)).astype(np.float32)
    scales = w_scales[None, :, :] * xd[:, None, :]  # (T, rows, nb) float32 products
    total = np.zeros((T, rows), np.float32)
    for b in range(nb):
        total += sums[:, :, b] * scales[:, :, b]
    return total


def unpacked(quant: str, w: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The int8 values (rows, n) and f32 block scales (rows, nb) of packed q40 or q80 rows."""
    rows, nb = w.shape[0], n // 32
    blocks = w.reshape(rows, nb, -1)
    scales = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    if quant == "q80":
        return blocks[:, :, 2:].view(np.int8).reshape(rows, n), scales
    packed_bytes = blocks[:, :, 2:]
    values = np.concatenate([packed_bytes & 15, packed_bytes >> 4], axis=2).astype(np.int8) - 8
    return values.reshape(rows, n), scales


QUANTIZERS = {"q40": quantize_q40, "q80": quantize_q80}


@pytest.mark.parametrize("quant", ["q40", "q80"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T", [2, 3, 5, 8, 11, 12, 17, 64])
@pytest.mark.parametrize("n", [160, 2048])
def test_the_batched_kernels_give_each_tokens_one_token_bits(both, quant, threads, T, n):
    """16 rows interleaved, up to 4 tokens per pass (a group of rows and a pass of tokens partly filled, odd
    block counts): each token's row equals the one-token kernel's, bit for bit, and both are the fixed
    block order's sums (numpy float32)."""
    _, compiled = both
    dispatch.set_threads(threads)
    rng = np.random.default_rng(T + n)
    _, xq, xd, xc = quantized_input(rng, T, n)
    rows = 71  # an odd row left at the end of the last task
    w = stored(QUANTIZERS[quant], rng, rows, n)
    reference = block_order_reference(*unpacked(quant, w, n), xq, xd)
    w = interleaved(w, QUANTIZERS[quant])
    batched = np.full((T, rows), np.nan, np.float32)
    getattr(compiled, f"matmul_{quant}")(w, xq, xd, xc, batched)
    assert np.array_equal(batched, reference)
    for t in range(T):
        one = np.full((1, rows), np.nan, np.float32)
        if quant == "q40":
            compiled.matvec_q40(w, xq[t], xd[t], xc[t], one[0])
        else:
            compiled.matmul_q80(w, xq[t:t + 1], xd[t:t + 1], xc[t:t + 1], one)
        assert np.array_equal(batched[t], one[0]), t


@pytest.mark.parametrize("threads", [1, 2])
def test_attention_silu_and_roundtrip_are_bit_identical(both, threads):
    jit, compiled = both
    dispatch.set_threads(threads)
    rng = np.random.default_rng(7)
    T, H, KVH, hd, S, pos0 = 3, 8, 2, 32, 40, 29
    q = rng.standard_normal((T, H, hd)).astype(np.float32)
    k, v = (rng.standard_normal((KVH, S, hd)).astype(np.float32) for _ in range(2))  # caches: (kv heads, positions, hd)
    want, have = np.empty((T, H * hd), np.float32), np.full((T, H * hd), np.nan, np.float32)
    jit.attention(q, k, v, pos0, want)
    compiled.attention(q, k, v, pos0, have)
    assert np.array_equal(want, have)
    a, b = (rng.standard_normal((4, 4096)).astype(np.float32) for _ in range(2))
    want, have = np.empty_like(a), np.full_like(a, np.nan)
    jit.silu_gate(a, b, want)
    compiled.silu_gate(a, b, have)
    assert np.array_equal(want, have)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    want, have = x.copy(), x.copy()
    jit.q80_roundtrip(want)
    compiled.q80_roundtrip(have)
    assert np.array_equal(want, have) and not np.array_equal(want, x)


def float64_attention(q, k, v, pos0):
    """numpy's attention in float64, rounded once: what the kernels' scalar loops (head_dim not a multiple of
    8) promise, in another order."""
    T, H, hd = q.shape
    group = H // k.shape[0]
    out = np.empty((T, H * hd), np.float32)
    for t in range(T):
        for h in range(H):
            n = pos0 + t + 1
            scores = k[h // group, :n].astype(np.float64) @ q[t, h].astype(np.float64) / np.sqrt(hd)
            weights = np.exp(scores - scores.max())
            out[t, h * hd:(h + 1) * hd] = weights / weights.sum() @ v[h // group, :n].astype(np.float64)
    return out


def fma32(a, b, c):
    """float32 fused multiply-add: the product of two float32 is exact in float64, and so, but for rare double
    roundings, is the sum."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def lane_tree(lanes):
    """A float32 vector's lanes (last axis) summed as the kernels' tree: halves added lane by lane."""
    while lanes.shape[-1] > 1:
        half = lanes.shape[-1] // 2
        lanes = lanes[..., :half] + lanes[..., half:]
    return lanes[..., 0]


def float32_order_attention(q, k, v, pos0):
    """The vector kernels' attention (head_dim a multiple of 8), operation by operation in numpy: each score a
    float32 sum of 16-lane fused multiply-adds over the head's dims and a lane tree (an 8-lane tail summed
    apart and added last), the softmax in float64, and each output dim the float32 fused multiply-adds of
    float32(weight) times v, row after row."""
    T, H, hd = q.shape
    group, wide = H // k.shape[0], hd // 16 * 16
    out = np.empty((T, H * hd), np.float32)
    for t in range(T):
        for h in range(H):
            n = pos0 + t + 1
            keys, values = k[h // group, :n], v[h // group, :n]
            acc = np.zeros((n, 16), np.float32)
            for d in range(0, wide, 16):
                acc = fma32(np.broadcast_to(q[t, h, d:d + 16], (n, 16)), keys[:, d:d + 16], acc)
            scores = lane_tree(acc)
            if hd % 16:
                scores = scores + lane_tree(fma32(np.broadcast_to(q[t, h, wide:], (n, 8)), keys[:, wide:],
                                                  np.zeros((n, 8), np.float32)))
            scores = scores.astype(np.float64) / np.sqrt(hd)
            weights = np.exp(scores - scores.max())
            weights = (weights / weights.sum()).astype(np.float32)
            z = np.zeros(hd, np.float32)
            for s in range(n):
                z = fma32(np.full(hd, weights[s]), values[s], z)
            out[t, h * hd:(h + 1) * hd] = z
    return out


def within_one_step(have: np.ndarray, want: np.ndarray) -> None:
    """float32 results of float64 arithmetic summed in another order: at most one float32 step apart, rarely."""
    assert np.all(np.abs(have - want) <= np.spacing(np.abs(want)))
    assert np.mean(have == want) > 0.99


@pytest.mark.parametrize("hd", [12, 40, 64, 72, 128])
@pytest.mark.parametrize("sharpness", [1.0, 60.0])
def test_attention_is_the_promised_arithmetic(both, hd, sharpness):
    """The vector kernels (hd a multiple of 8: float32 sums in a fixed order, 64 dims a pass over the cache, then
    16 and 8 at a time; the softmax's own exp in float64) give their order's bits, but for the softmax's last
    float64 bit flipping a weight's float32 rounding now and then; the scalar loops (other hd) give numpy's
    float64 attention rounded once. Sharp scores put most weights below e^-708, where the exp clamps."""
    _, compiled = both
    rng = np.random.default_rng(hd)
    T, H, KVH, S, pos0 = 5, 6, 2, 90, 70
    q = (rng.standard_normal((T, H, hd)) * sharpness).astype(np.float32)
    k, v = (rng.standard_normal((KVH, S, hd)).astype(np.float32) for _ in range(2))  # caches: (kv heads, positions, hd)
    have = np.full((T, H * hd), np.nan, np.float32)
    compiled.attention(q, k, v, pos0, have)
    if hd % 8:
        within_one_step(have, float64_attention(q, k, v, pos0))
        return
    want = float32_order_attention(q, k, v, pos0)
    assert np.all(np.abs(have - want) <= 4 * np.spacing(np.abs(want)))
    assert np.mean(have == want) > 0.999
    assert np.max(np.abs(have - float64_attention(q, k, v, pos0))) < 2e-6 * sharpness  # float32 scores' error


def test_silu_gate_is_the_float64_formula_rounded_once(both):
    _, compiled = both
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((3, 1003)) * np.array([[1.0], [20.0], [900.0]])).astype(np.float32)  # 1003: a tail
    b = rng.standard_normal((3, 1003)).astype(np.float32)
    have = np.full_like(a, np.nan)
    compiled.silu_gate(a, b, have)
    x = a.astype(np.float64)
    with np.errstate(over="ignore"):
        within_one_step(have, (x / (1.0 + np.exp(-x)) * b).astype(np.float32))


@pytest.mark.parametrize("n", [3, 64, 100, 576, 1000, 2048, 5000])
def test_the_compiled_rmsnorm_sums_in_numpys_order(n):
    """The programs' rmsnorm gives model.rmsnorm's bits (numpy's pairwise sum), whatever the length."""
    from dllama.runtime import kernels
    from dllama.runtime.model import rmsnorm

    rng = np.random.default_rng(n)
    for _ in range(20):
        x = (rng.standard_normal(n) * rng.uniform(0.01, 100)).astype(np.float32)
        weight = rng.standard_normal(n).astype(np.float32)
        have = np.empty(n, np.float32)
        kernels.rmsnorm_token(x, weight, 1e-5, have, np.empty(n, np.float64))
        assert np.array_equal(have, rmsnorm(x[None], weight, 1e-5)[0])


def test_strided_weights_are_accepted(both):
    """A column slice (a strided view, FORMAT.md §3) interleaves like its copy, in both kernels' builds."""
    jit, compiled = both
    rng = np.random.default_rng(3)
    _, xq, xd, xc = quantized_input(rng, 1, 128)
    w = stored(quantize_q40, rng, 40, 256)[:, :4 * 18]  # the first 128 columns: a strided view
    want = np.empty((48, w.shape[1]), np.uint8)
    jit.interleave_q40(np.ascontiguousarray(w), want)
    have = np.empty_like(want)
    compiled.interleave_q40(w, have)
    assert np.array_equal(want, have)
    padded = np.zeros((48, w.shape[1]), np.uint8)
    padded[:40] = w
    assert np.array_equal(dispatch.interleave_q40(padded), have)  # the last group's 8 missing rows are zeros
    out = np.empty(40, np.float32)
    compiled.matvec_q40(have, xq[0], xd[0], xc[0], out)
    assert np.array_equal(out[None], block_order_reference(*unpacked("q40", w, 128), xq, xd))


RUN_ENGINE = """
import json, sys
import numpy as np
from dllama.runtime import dispatch
from dllama.runtime.engine import Engine
logits = Engine.load(sys.argv[1], max_seq_len=32, nthreads=2).forward([1, 5, 9, 2, 7], 0)
np.save(sys.argv[2], logits)
print(json.dumps({"kernels": dispatch.implementation(), "numba_loaded": "numba" in sys.modules}))
"""


def run_engine(model: Path, out: Path, **env) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN_ENGINE, str(model), str(out)], capture_output=True, text=True,
                          env=dict(os.environ, NUMBA_NUM_THREADS="2", **env), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_runtime_process_runs_without_numba_and_agrees_with_the_jit(both, tmp_path):
    model = write_random_model(tmp_path / "m.m", FloatType.Q40)
    compiled = run_engine(model, tmp_path / "compiled.npy", DLLAMA_KERNELS="compiled")
    jit = run_engine(model, tmp_path / "jit.npy", DLLAMA_KERNELS="jit")
    assert compiled == {"kernels": "compiled", "numba_loaded": False}
    assert jit == {"kernels": "jit", "numba_loaded": True}
    assert np.array_equal(np.load(tmp_path / "compiled.npy"), np.load(tmp_path / "jit.npy"))


@pytest.mark.slow
def test_without_a_c_compiler_the_runtime_falls_back_to_the_jit_with_one_message(tmp_path):
    model = write_random_model(tmp_path / "m.m", FloatType.Q40)
    env = dict(os.environ, DLLAMA_CACHE=str(tmp_path / "cache"), CC="false", NUMBA_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", RUN_ENGINE, str(model), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["kernels"] == "jit"
    notes = [line for line in done.stderr.splitlines() if "cannot build the compiled kernels" in line]
    assert len(notes) == 1 and "C compiler" in notes[0]
    assert not list((tmp_path / "cache" / "kernels").iterdir())  # no half-built module left behind
    env["DLLAMA_KERNELS"] = "compiled"
    done = subprocess.run([sys.executable, "-c", RUN_ENGINE, str(model), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode != 0 and "DLLAMA_KERNELS=compiled but the compiled kernels cannot be built" in done.stderr


def test_two_callers_at_once_share_the_thread_team_safely(both):
    """The serve scheduler runs one engine thread, but nothing stops two: the team then runs one
    caller's ranges on helpers and the other's on its own thread."""
    import threading

    jit, compiled = both
    rng = np.random.default_rng(11)
    _, xq, xd, xc = quantized_input(rng, 1, 2048)
    w = packed(quantize_q40, rng, 512, 2048)
    want = np.empty(512, np.float32)
    jit.matvec_q40(w, xq[0], xd[0], xc[0], want)
    failures = []

    def caller():
        dispatch.set_threads(2)
        for _ in range(200):
            have = np.full(512, np.nan, np.float32)
            compiled.matvec_q40(w, xq[0], xd[0], xc[0], have)
            if not np.array_equal(want, have):
                failures.append(have)

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_the_team_and_the_kernels_agree_on_the_job_table():
    from dllama.runtime import kernels
    from dllama.runtime.kernels import program

    assert dispatch.JOB_WORDS == kernels.JOB_WORDS and kernels.NO_JOB == 0
    assert dispatch.GROUP_ROWS == kernels.ir.GROUP_ROWS  # dispatch pads interleaved arrays to the kernels' groups
    assert 4 + 4 * 7 <= kernels.JOB_WORDS  # kind, range, scalar, then up to 7 arrays (address + 3 dims)
    ops = ("OP_WORDS", "OP_NORM_Q80", "OP_MATMUL", "OP_FFN_UP", "OP_ROPE_KV", "OP_ATTENTION", "OP_QUANTIZE",
           "W_F32", "W_Q40", "W_Q80", "BARRIER_STRIDE")
    assert [getattr(dispatch, name) for name in ops] == [getattr(program, name) for name in ops]


def test_the_team_grows_to_the_threads_asked_for_and_old_helpers_stop(both):
    _, compiled = both
    compiled = dispatch.CompiledKernels(compiled.m)
    rng = np.random.default_rng(5)
    _, xq, xd, xc = quantized_input(rng, 1, 2048)
    w = packed(quantize_q40, rng, 512, 2048)
    out = np.empty(512, np.float32)
    dispatch.set_threads(1)
    compiled.matvec_q40(w, xq[0], xd[0], xc[0], out)
    assert compiled._team is None  # one thread: no helpers at all
    dispatch.set_threads(2)
    compiled.matvec_q40(w, xq[0], xd[0], xc[0], out)
    assert compiled._team.n_helpers == 1
    first = compiled._team
    first.stop()
    for t in first.threads:
        t.join(timeout=5)
        assert not t.is_alive()
    compiled._team = None
    compiled.matvec_q40(w, xq[0], xd[0], xc[0], out)  # a fresh team works after the old one stopped
    assert compiled._team is not first


# --------------------------------------------------------------------------------------------
# The int8 dot-product paths (cpu.KERNEL_PATHS): chosen from what the CPU reports, same bits

def fake_auxv(path: Path, hwcap: int, hwcap2: int) -> str:
    words = [cpu.AT_HWCAP, hwcap, cpu.AT_HWCAP2, hwcap2, 0, 0]  # AT_NULL ends the vector
    path.write_bytes(np.array(words, dtype=np.uint64).tobytes())
    return str(path)


def test_hwcap_bits_choose_the_arm_kernels_features(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "is_aarch64", lambda: True)
    monkeypatch.delenv("DLLAMA_NO_DOTPROD", raising=False)
    asimd = 1 << 1
    pi3 = fake_auxv(tmp_path / "a53", asimd, 0)
    pi5 = fake_auxv(tmp_path / "a76", asimd | cpu.HWCAP_ASIMDDP, 0)
    i8mm = fake_auxv(tmp_path / "a710", asimd | cpu.HWCAP_ASIMDDP, cpu.HWCAP2_I8MM)
    assert cpu.hwcaps(pi5) == (asimd | cpu.HWCAP_ASIMDDP, 0)
    assert [cpu.arm_target_features(a) for a in (pi3, pi5, i8mm)] == ["+neon", "+neon,+dotprod", "+neon,+dotprod,+i8mm"]
    monkeypatch.setenv("DLLAMA_NO_DOTPROD", "1")
    assert cpu.arm_target_features(pi5) == "+neon"
    monkeypatch.setattr(cpu, "is_aarch64", lambda: False)
    assert cpu.arm_target_features(pi5) == ""


DOT_PRODUCT_INSTRUCTIONS = {"vnni512": "vpdpbusd", "sdot": "sdot"}


def test_the_compiled_module_holds_the_dot_product_instructions_of_its_path_only(both):
    """A Pi 5 (cortex-a76) module has sdot, a Pi 3B+ (cortex-a53) one none: read in its machine code."""
    _, compiled = both
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is missing: the C compiler that built the kernels needs it too"
    code = subprocess.run([objdump, "-d", compiled.m.__file__], capture_output=True, text=True, check=True).stdout
    found = {path: len(re.findall(rf"\s{instruction}\s", code))
             for path, instruction in DOT_PRODUCT_INSTRUCTIONS.items()}
    assert {path: count > 0 for path, count in found.items()} == {path: path == compiled.path for path in found}


PORTABLE_RUN = """
import sys, numpy as np
from dllama.runtime import dispatch
a = dict(np.load(sys.argv[1]))
a["matmul_q40"], a["matmul_q80"] = dispatch.interleave_q40(a["matmul_q40"]), dispatch.interleave_q80(a["matmul_q80"])
out = {}
for name in ("matmul_q40", "matmul_q80"):
    out[name] = np.empty((a["xq"].shape[0], a["rows"]), np.float32)
    getattr(dispatch, name)(a[name], a["xq"], a["xd"], a["xc"], out[name])
out["matvec_q40"] = np.empty(out["matmul_q40"].shape[1], np.float32)
dispatch.matvec_q40(a["matmul_q40"], a["xq"][0], a["xd"][0], a["xc"][0], out["matvec_q40"])
out["matvec_q80"] = np.empty((1, a["rows"]), np.float32)
dispatch.matmul_q80(a["matmul_q80"], a["xq"][:1], a["xd"][:1], a["xc"][:1], out["matvec_q80"])
assert dispatch.kernel_path() == "portable", dispatch.kernel_path()
np.savez(sys.argv[2], **out)
"""


@pytest.mark.slow
@pytest.mark.parametrize("T, rows, n", [(5, 203, 160), (12, 64, 2048)])
def test_the_dot_product_path_gives_the_portable_paths_bits(both, tmp_path, T, rows, n):
    """This CPU's vpdpbusd/sdot kernels against the portable ones (a second module, built with
    them switched off) on the same inputs: odd block counts, row groups and single rows, q40 and q80,
    tokens in lanes and one token."""
    _, compiled = both
    if compiled.path == "portable":
        pytest.skip("this CPU's kernels are the portable path: there is no dot-product path to compare")
    rng = np.random.default_rng(n + T)
    _, xq, xd, xc = quantized_input(rng, T, n)
    weights = {"matmul_q40": stored(quantize_q40, rng, rows, n), "matmul_q80": stored(quantize_q80, rng, rows, n)}
    np.savez(tmp_path / "in.npz", xq=xq, xd=xd, xc=xc, rows=rows, **weights)  # each process interleaves
    weights = {name: interleaved(w, QUANTIZERS[name[-3:]]) for name, w in weights.items()}
    env = dict(os.environ, DLLAMA_KERNELS="compiled", DLLAMA_NO_VNNI="1", DLLAMA_NO_DOTPROD="1",
               NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    done = subprocess.run([sys.executable, "-c", PORTABLE_RUN, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    portable = np.load(tmp_path / "out.npz")
    for name, w in weights.items():
        have = np.full((T, rows), np.nan, np.float32)
        getattr(compiled, name)(w, xq, xd, xc, have)
        assert np.array_equal(portable[name], have), name
    have = np.full(rows, np.nan, np.float32)
    compiled.matvec_q40(weights["matmul_q40"], xq[0], xd[0], xc[0], have)
    assert np.array_equal(portable["matvec_q40"], have)
    have = np.full((1, rows), np.nan, np.float32)
    compiled.matmul_q80(weights["matmul_q80"], xq[:1], xd[:1], xc[:1], have)
    assert np.array_equal(portable["matvec_q80"], have)
