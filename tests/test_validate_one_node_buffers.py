"""Issue 12 item 4: one node rounds no partials through q80 unless --buffer-float-type q80 asks."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import CONFORMANCE, require_fixtures

from dllama.runtime.engine import Engine, EngineError


def q40_model():
    return require_fixtures(CONFORMANCE / "tiny-llama") / "expected_q40.m"


def test_one_node_keeps_partials_float_unless_q80_buffers_are_asked_for():
    ids = list(np.load(require_fixtures(CONFORMANCE / "tiny-llama") / "reference_logits.npz")["ids0"])
    default = Engine.load(q40_model(), max_seq_len=64)
    as_f32 = Engine.load(q40_model(), max_seq_len=64, buffer_float_type="f32")
    as_q80 = Engine.load(q40_model(), max_seq_len=64, buffer_float_type="q80")
    assert not default.exchange.quantize_partials and as_q80.exchange.quantize_partials
    assert np.array_equal(default.forward(ids, 0), as_f32.forward(ids, 0))
    assert not np.array_equal(default.forward(ids, 0), as_q80.forward(ids, 0))


def test_unknown_buffer_float_type_is_refused():
    with pytest.raises(EngineError, match="use q80 or f32"):
        Engine.load(q40_model(), buffer_float_type="q40")


def test_dllama_run_honours_buffer_float_type_on_one_node(monkeypatch, tmp_path):
    from dllama.cli import loading

    seen = {}
    real_load = Engine.load

    def load(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(Engine, "load", load)
    folder = require_fixtures(CONFORMANCE / "tiny-llama")
    session = loading.load_model(folder / "expected_q40.m", folder / "expected.t", 64, 1,
                                 loading.ClusterOptions(buffer_float_type="q80"))
    assert seen["buffer_float_type"] == "q80" and session.engine.exchange.quantize_partials
