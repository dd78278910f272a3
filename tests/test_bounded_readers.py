"""Each reader bounds what it believes (issue 28): the worst inputs the issue reproduced, each
refused by the reader that owns the format, with the file and the field in the message. The fuzz
suite (test_fuzz_inputs.py) runs thousands more through the command lines."""
from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFORMANCE
from gguf_helpers import gguf_from_hf_folder, write_gguf_like

from dllama.checkpoint import Checkpoint, CheckpointError, read_safetensors_index
from dllama.converter.convert import ConversionError, convert
from dllama.errors import FormatError
from dllama.formats import HeaderKey, ModelFile, read_tokenizer
from dllama.gguf_checkpoint import GGUFCheckpoint, GGUFError

LLAMA = CONFORMANCE / "tiny-llama"


def with_header_value(source: Path, target: Path, key: HeaderKey, value: int) -> Path:
    data = bytearray(source.read_bytes())
    header_size = struct.unpack_from("<i", data, 4)[0]
    for at in range(8, header_size, 8):
        if struct.unpack_from("<i", data, at)[0] == key:
            struct.pack_into("<i", data, at + 4, value)
    target.write_bytes(data)
    return target


def test_a_model_claiming_two_billion_layers_is_refused_before_planning(tmp_path):
    path = with_header_value(LLAMA / "expected_q40.m", tmp_path / "m.m", HeaderKey.N_LAYERS, 2**31 - 1)
    with pytest.raises(FormatError, match=r"m\.m has n_layers 2147483647 .* outside 1\.\.4096"):
        ModelFile(path)


def test_a_model_of_plausible_header_but_wrong_size_is_refused(tmp_path):
    path = with_header_value(LLAMA / "expected_q40.m", tmp_path / "m.m", HeaderKey.N_LAYERS, 3)
    with pytest.raises(FormatError, match="truncated"):
        ModelFile(path)


def embedded_section(raw_len: int, packed: bytes, crc: int = 0) -> bytes:
    return b"DLXT" + struct.pack("<6I", 1, 1, 1, raw_len, len(packed), crc) + packed


@pytest.mark.parametrize("raw_len, match", [(1 << 30, "expands to 1073741824 bytes"), (4096, "beyond its stated")])
def test_a_zip_bomb_in_the_tokenizer_is_refused_without_expanding_it(tmp_path, raw_len, match):
    bomb = zlib.compress(bytes(64 << 20), 1)  # 64 MiB of zeros in 64 KB
    path = tmp_path / "t.t"
    path.write_bytes((LLAMA / "expected.t").read_bytes() + embedded_section(raw_len, bomb))
    with pytest.raises(FormatError, match=match):
        read_tokenizer(path)


def test_a_tokenizer_claiming_more_tokens_than_its_bytes_hold_is_refused(tmp_path):
    data = bytearray((LLAMA / "expected.t").read_bytes())
    for at in range(8, struct.unpack_from("<i", data, 4)[0], 8):
        if struct.unpack_from("<i", data, at)[0] == 1:  # vocab_size
            struct.pack_into("<i", data, at + 4, 2**31 - 1)
    (tmp_path / "t.t").write_bytes(data)
    with pytest.raises(FormatError, match="vocab_size 2147483647 .* impossible for a file of"):
        read_tokenizer(tmp_path / "t.t")


def safetensors_with_header(tmp_path: Path, edit) -> Path:
    raw = (LLAMA / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    header = edit(json.loads(raw[8:8 + n]))
    text = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return path


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _second(header: dict) -> str:
    return [k for k in header if k != "__metadata__"][1]


@pytest.mark.parametrize("edit, match", [
    (lambda h: list(h), "is a JSON list, not an object"),
    (lambda h: "x", "is a JSON str, not an object"),
    (lambda h: {**h, _first(h): {**h[_first(h)], "data_offsets": [-2, 0]}}, "data_offsets"),
    (lambda h: {**h, _second(h): {**h[_second(h)], "data_offsets": h[_first(h)]["data_offsets"],
                                  "shape": h[_first(h)]["shape"], "dtype": h[_first(h)]["dtype"]}},
     "overlaps|gap"),
    (lambda h: {**h, _first(h): {**h[_first(h)], "shape": ["64", 384]}}, "shape"),
    (lambda h: {**h, _first(h): {**h[_first(h)], "dtype": 5}}, "dtype 5"),
])
def test_malformed_safetensors_headers_are_refused(tmp_path, edit, match):
    path = safetensors_with_header(tmp_path, edit)
    with pytest.raises(CheckpointError, match=match):
        read_safetensors_index(path)


@pytest.mark.parametrize("key, value", [("num_hidden_layers", 10**9), ("num_hidden_layers", "2"),
                                        ("hidden_size", -64), ("vocab_size", 2.5)])
def test_absurd_or_mistyped_config_values_are_refused_naming_the_key(tmp_path, key, value):
    folder = tmp_path / "ckpt"
    shutil.copytree(LLAMA, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointError, match=rf"config\.json has {key} = "):
        convert(folder, "q40", tmp_path / "out")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return gguf_from_hf_folder(LLAMA, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def gguf_with_field(source: Path, target: Path, key: str, value: int) -> Path:
    """The GGUF with one integer metadata value overwritten in place (same type, same size)."""
    from gguf import GGUFReader

    field = GGUFReader(source).fields[key]
    data = bytearray(source.read_bytes())
    part = field.parts[field.data[0]]
    offset = field.offset + sum(p.nbytes for p in field.parts[:field.data[0]])
    data[offset:offset + part.nbytes] = part.dtype.type(value).tobytes()
    target.write_bytes(data)
    return target


def test_a_gguf_saying_zero_blocks_but_holding_two_is_refused(tmp_path, tiny_gguf):
    path = gguf_with_field(tiny_gguf, tmp_path / "g.gguf", "llama.block_count", 0)
    with pytest.raises(CheckpointError, match="num_hidden_layers = 0"):
        convert(path, "q40", tmp_path / "out")


def test_a_gguf_saying_fewer_blocks_than_it_holds_is_refused(tmp_path, tiny_gguf):
    path = gguf_with_field(tiny_gguf, tmp_path / "g.gguf", "llama.block_count", 1)
    with pytest.raises(ConversionError, match=r"holds layer 1 .* says 1 \(looked in .*g\.gguf\)"):
        convert(path, "q40", tmp_path / "out")


def test_a_gguf_with_alignment_zero_is_refused(tmp_path, tiny_gguf):
    aligned = write_gguf_like(tiny_gguf, tmp_path / "aligned.gguf", alignment=64)
    path = gguf_with_field(aligned, tmp_path / "g.gguf", "general.alignment", 0)
    with pytest.raises(GGUFError, match="general.alignment 0, not a power of two"):
        GGUFCheckpoint(path)


def test_an_inf_weight_is_refused_by_the_converter(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(LLAMA, folder)
    entry = Checkpoint(folder).entries["model.layers.1.mlp.up_proj.weight"]
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[entry.start + 10:entry.start + 12] = b"\x80\x7f"  # bf16 +inf
    (folder / "model.safetensors").write_bytes(data)
    with pytest.raises(ConversionError, match=r"model\.safetensors holds inf or NaN values in "
                                              r"model\.layers\.1\.mlp\.up_proj\.weight"):
        convert(folder, "q40", tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_logits_are_named_instead_of_sampled(temperature):
    from dllama.runtime.sampler import NaNLogits, Sampler

    logits = np.array([0.5, np.nan, 2.0, 1.0], np.float32)
    with pytest.raises(NaNLogits, match="weights hold inf or NaN"):
        Sampler(temperature=temperature, seed=1)(logits)


def test_a_model_with_an_inf_weight_stops_dllama_run_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from dllama.cli.dllama_run import app

    model = tmp_path / "inf.m"
    data = bytearray((LLAMA / "expected_f32.m").read_bytes())
    norm = ModelFile(LLAMA / "expected_f32.m").layout["norm"].offset
    data[norm:norm + 4] = np.float32(np.inf).tobytes()  # the final norm: every logit becomes inf or NaN
    model.write_bytes(data)
    result = CliRunner().invoke(app, ["--model", str(model), "--tokenizer", str(LLAMA / "expected.t"), "--prompt",
                                      "Hello", "--steps", "2", "--temperature", "0.8", "--threads", "1"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: the model computed NaN or infinite logits")
