"""The format module against the reference converter's bytes and against itself."""
from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dllama.checkpoint import Checkpoint, header_from_config
from dllama.formats import (
    FloatType,
    FormatError,
    ModelFile,
    decode_tensor,
    dequantize_q40,
    dequantize_q80,
    encode_tensor,
    padded_vocabulary,
    parse_model_header,
    parse_tokenizer,
    quantize_q40,
    quantize_q80,
    tensor_nbytes,
)
from dllama.formats.codecs import _plain

# magnitudes where the f16 block scale stays a normal number
finite_blocks = arrays(np.float32, st.integers(1, 4).map(lambda n: (n, 32)),
                       elements=st.floats(-1e4, 1e4, width=32).filter(lambda v: v == 0 or abs(v) >= 1e-2))


@pytest.mark.parametrize("quant", ["f32", "q40", "q80"])
def test_header_matches_reference_converter(conformance_dir, quant):
    expected = (conformance_dir / f"expected_{quant}.m").read_bytes()
    header = header_from_config(Checkpoint(conformance_dir).config, FloatType.parse(quant))
    assert header.to_bytes() == expected[:header.nbytes]
    assert parse_model_header(expected) == header


@pytest.mark.parametrize("quant", ["q40", "q80"])
def test_quantized_tensors_decode_close_to_f32_file(conformance_dir, quant):
    exact = ModelFile(conformance_dir / "expected_f32.m")
    quantized = ModelFile(conformance_dir / f"expected_{quant}.m")
    w = exact.tensor("layers.0.w1")
    step = np.abs(w).reshape(-1, 32).max(axis=1).repeat(32).reshape(w.shape) / (8 if quant == "q40" else 127)
    assert np.all(np.abs(quantized.tensor("layers.0.w1") - w) <= step * 1.01 + 1e-6)


@settings(max_examples=200, deadline=None)
@given(finite_blocks)
def test_q80_round_trip_error_is_half_a_step(x):
    y = dequantize_q80(quantize_q80(x))
    d = np.abs(x).max(axis=1) / 127
    assert np.all(np.abs(y.reshape(x.shape) - x) <= (d * 0.5 + d * 2e-3 + 1e-30)[:, None] + np.abs(x) * 1e-3)


@settings(max_examples=200, deadline=None)
@given(finite_blocks)
def test_q40_round_trip_error_is_within_one_step(x):
    y = dequantize_q40(quantize_q40(x)).reshape(x.shape)
    d = np.abs(x).max(axis=1) / 8
    assert np.all(np.abs(y - x) <= (d * 1.01 + 1e-30)[:, None])


def test_q40_tie_takes_the_positive_maximum():
    x = np.zeros(32, np.float32)
    x[0], x[1] = -2.0, 2.0
    d = quantize_q40(x)[:2].view(np.float16)[0]
    assert d == np.float16(-0.25)


def test_quantizing_a_row_not_multiple_of_32_is_refused():
    with pytest.raises(FormatError, match="not a multiple of 32"):
        encode_tensor(np.ones((2, 48), np.float32), FloatType.Q40)


def test_f16_round_trip():
    x = np.linspace(-3, 3, 64, dtype=np.float32).reshape(2, 32)
    assert np.array_equal(decode_tensor(encode_tensor(x, FloatType.F16), FloatType.F16, x.shape),
                          x.astype(np.float16).astype(np.float32))


def test_bad_model_magic_is_named():
    with pytest.raises(FormatError, match="bad magic"):
        parse_model_header(b"\x01\x02\x03\x04" + b"\x00" * 60)


def test_old_model_format_is_named():
    with pytest.raises(FormatError, match="old distributed-llama format"):
        parse_model_header(np.array([0xABCD00, 8], "<i4").tobytes())


def test_truncated_model_file_is_refused(conformance_dir, tmp_path):
    data = (conformance_dir / "expected_q40.m").read_bytes()
    (tmp_path / "cut.m").write_bytes(data[:-7])
    with pytest.raises(FormatError, match="truncated"):
        ModelFile(tmp_path / "cut.m")


def test_file_rows_read_the_rows_the_map_holds(conformance_dir):
    model = ModelFile(conformance_dir / "expected_q40.m")
    mapped, read = model.blocks("embedding"), model.rows("embedding")
    assert len(read) == len(mapped)
    assert np.array_equal(read[5], mapped[5]) and read[5].dtype == np.float32
    for ids in ([7, 0, 7, len(mapped) - 1], np.array([[3, 2], [1, 9]]), []):
        assert np.array_equal(read[ids], mapped[np.asarray(ids, dtype=np.int64).reshape(-1)])
    assert np.array_equal(read[-1], mapped[-1])
    with pytest.raises(IndexError, match="out of range"):
        read[[1, len(mapped)]]
    with pytest.raises(FormatError, match="only from float tensors"):
        model.rows("layers.0.q")


def test_tokenizer_file_round_trips(conformance_dir):
    data = (conformance_dir / "expected.t").read_bytes()
    tf = parse_tokenizer(data)
    assert tf.vocab_size == 384 and tf.eos_ids == [383] and tf.bos_id == 382
    assert tf.to_bytes() == data


def test_a_tokenizer_may_be_smaller_than_a_padded_embedding_but_never_larger():
    assert padded_vocabulary(151936, 151669)          # Qwen3
    assert not padded_vocabulary(32000, 32000)       # equal is no padding
    assert not padded_vocabulary(32000, 32001)       # ids past the embedding
    assert not padded_vocabulary(128256, 32000)      # another model's tokenizer


# -- the reference codecs byte for byte, and their edges (docs/TESTING.md, "Mutation testing")

@pytest.mark.parametrize("quant", ["q40", "q80"])
def test_reference_quantizers_write_the_reference_converters_bytes(conformance_dir, quant):
    exact = ModelFile(conformance_dir / "expected_f32.m")
    quantized = ModelFile(conformance_dir / f"expected_{quant}.m")
    ft = FloatType.parse(quant)
    names = [name for name, t in quantized.layout.items() if t.spec.float_type == ft]
    assert len(names) > 5
    for name in names:
        assert encode_tensor(exact.tensor(name), ft).tobytes() == quantized.raw(name).tobytes(), name


@pytest.mark.parametrize("quant, low, high", [("q40", -8, 7), ("q80", -127, 127)])
def test_blocks_of_zeros_and_of_scale_one_round_trip_exactly(quant, low, high):
    ft = FloatType.parse(quant)
    x = np.zeros((2, 32), np.float32)
    x[1] = np.random.default_rng(1).integers(low, high + 1, 32)
    x[1, 0] = low                          # q40: d = -8 / -8, q80: d = 127 / 127: a scale of exactly 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # a zero block's scale must not warn "divide by zero"
        data = encode_tensor(x, ft)
    assert np.array_equal(decode_tensor(data, ft, x.shape), x)
    if ft == FloatType.Q40:
        assert data[2:18].tolist() == [0x88] * 16   # a zero block stores q = 8 (zero) in both nibbles


@pytest.mark.parametrize("quantize, dequantize", [(quantize_q40, dequantize_q40), (quantize_q80, dequantize_q80)])
def test_dequantizing_gives_flat_values_and_the_first_n(quantize, dequantize):
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    data = quantize(x)
    every = dequantize(data)
    assert every.shape == (128,) and every.dtype == np.float32
    first = dequantize(data, 40)
    assert first.shape == (40,) and np.array_equal(first, every[:40])


def test_f16_tensors_of_any_length_decode():
    x = np.array([1.5, -2.0, 0.25], np.float32)   # 6 bytes: not a whole number of 8-byte words
    assert np.array_equal(decode_tensor(encode_tensor(x, FloatType.F16), FloatType.F16, (3,)), x)


def test_float_type_errors_name_the_problem():
    with pytest.raises(FormatError, match="unknown float type 'q50': use one of f32, f16, q40, q80"):
        FloatType.parse("q50")
    with pytest.raises(FormatError, match="cannot encode 9"):
        encode_tensor(np.zeros(32, np.float32), 9)
    with pytest.raises(FormatError, match="cannot decode 9"):
        decode_tensor(np.zeros(34, np.uint8), 9, (32,))
    with pytest.raises(FormatError, match="48 values do not fill whole q40 blocks of 32"):
        tensor_nbytes((2, 24), FloatType.Q40)
    with pytest.raises(FormatError, match="row length 40 is not a multiple of 32, so it cannot be block-quantized"):
        encode_tensor(np.ones((2, 3, 40), np.float32), FloatType.Q80)


@pytest.mark.parametrize("ft", [FloatType.Q40, FloatType.Q80, FloatType.F16])
def test_float64_values_are_encoded_as_their_float32_rounding(ft):
    # each float64 value below rounds differently straight to the stored grid than through float32:
    # q80 (d = 1): 0.5 + 1e-10 -> 1, its float32 0.5 -> 0 (half to even); q40 (d = -1): 8.5 - (0.5 + 1e-10)
    # truncates to 7, 8.5 - 0.5 to 8; f16: 1 + 2**-11 + 2**-40 -> 1 + 2**-10, its float32 (a tie) -> 1
    x = np.zeros(32)
    x[0] = {FloatType.Q40: 8.0, FloatType.Q80: 127.0, FloatType.F16: 1 + 2**-11 + 2**-40}[ft]
    x[1] = 0.5 + 1e-10
    expected = encode_tensor(x.astype(np.float32), ft).tobytes()
    assert encode_tensor(x, ft).tobytes() == expected
    if ft != FloatType.F16:
        assert (quantize_q40 if ft == FloatType.Q40 else quantize_q80)(x).tobytes() == expected


@pytest.mark.parametrize("dtype, letter", [("<f4", "f"), ("<f2", "e")])
def test_a_plain_codec_stores_flat_little_endian_values(dtype, letter):
    # built here: the table's codecs are made at import, before a mutation run picks its mutant
    encode, decode = _plain(dtype)
    x = np.array([[1.5, -2.0], [0.25, 65504.0]], np.float32)
    data = encode(x)
    assert data.dtype == np.uint8 and data.shape == (4 * struct.calcsize(letter),)
    assert data.tobytes() == struct.pack(f"<4{letter}", 1.5, -2.0, 0.25, 65504.0)
    back = decode(data)
    assert back.dtype == np.float32 and back.tolist() == [1.5, -2.0, 0.25, 65504.0]
