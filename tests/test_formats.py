"""The format module against the reference converter's bytes and against itself."""
from __future__ import annotations

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
)

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
