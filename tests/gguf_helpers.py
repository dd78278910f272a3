"""GGUF files for tests: a Hugging Face folder made from a GGUF, and small GGUF files written here.

`hf_folder_from_gguf` is what transformers does when it loads a GGUF and saves it (weights
dequantized with gguf.quants, q/k rows un-permuted), with the project's own safetensors writer;
the config and tokenizer files come from ../shared/fixtures/smollm2, which transformers wrote.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from dllama.converter.synthetic import encode_values, write_safetensors
from dllama.formats import tensor_plan
from dllama.gguf_checkpoint import GGUFCheckpoint
from dllama.formats import FloatType

HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def hf_folder_from_gguf(gguf_path: Path, folder: Path, hf_files_from: Path) -> Path:
    """A float32 Hugging Face checkpoint holding exactly the GGUF's (dequantized) weights."""
    ckpt = GGUFCheckpoint(gguf_path)
    folder.mkdir(parents=True, exist_ok=True)
    header = ckpt.header(FloatType.F32)
    names = [s.hf_name for s in tensor_plan(header) if s.hf_name in ckpt]
    tensors = [(name, ckpt.entries[name].shape) for name in names]
    write_safetensors(folder / "model.safetensors", tensors, "F32",
                      lambda f, name, shape: f.write(encode_values(ckpt.get(name).reshape(-1), "F32").tobytes()))
    for name in HF_FILES:
        if (hf_files_from / name).is_file():
            shutil.copy(hf_files_from / name, folder / name)
    return folder


def write_gguf_like(source: Path, target: Path, retype: dict[str, str] | None = None,
                    drop_fields: tuple[str, ...] = (), arch: str | None = None,
                    tensor_type: str | None = None, labelled: str | None = None) -> Path:
    """A copy of a GGUF file through gguf.GGUFWriter, changing what a test needs changed:
    `tensor_type` re-encodes every 2-D weight as Q4_0 / Q8_0 (with gguf.quants.quantize) and
    `labelled` then names that type something else of the same block size (IQ4_NL for Q4_0),
    `drop_fields` leaves metadata keys out, `arch` renames general.architecture."""
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    old_arch = reader.fields["general.architecture"].contents()
    new_arch = arch or old_arch
    writer = GGUFWriter(target, new_arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_fields:
            continue
        value = field.contents()
        new_key = key.replace(f"{old_arch}.", f"{new_arch}.", 1) if key.startswith(f"{old_arch}.") else key
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(new_key, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(new_key, value, vtype)
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        if tensor_type and len(shape) == 2:
            ckpt_values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(shape)
            qtype = GGMLQuantizationType[tensor_type]
            data = gguf.quants.quantize(ckpt_values.astype(np.float32), qtype)
            label = GGMLQuantizationType[labelled] if labelled else qtype
            writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=label)
        else:
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_shape=np.asarray(tensor.data).shape,
                              raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def write_sentencepiece_gguf(spm_model: Path, target: Path, add_bos: bool = True) -> Path:
    """A metadata-only llama GGUF whose tokenizer is a sentencepiece model, stored as llama.cpp's
    convert_hf_to_gguf.py stores one (`_set_vocab_sentencepiece`: pieces, scores, token types)."""
    import sentencepiece as spm
    from gguf import GGUFWriter

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 1)
    writer = GGUFWriter(target, "llama")
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
