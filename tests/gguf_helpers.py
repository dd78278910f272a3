"""GGUF files for tests: a Hugging Face folder made from a GGUF, and small GGUF files written here.

`hf_folder_from_gguf` is what transformers does when it loads a GGUF and saves it (weights
dequantized with gguf.quants, q/k rows un-permuted), with the project's own GGUF reader and
safetensors writer; test_gguf_transformers.py proves that reader bit-identical to transformers'
own on SmolLM2's GGUF, so the folder holds transformers' tensors. The config and tokenizer files
come from ../shared/fixtures/smollm2, which transformers wrote.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from dllama.converter.synthetic import encode_values, write_safetensors
from dllama.formats import FloatType, tensor_plan
from dllama.gguf_checkpoint import GGUFCheckpoint

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
                    tensor_type: str | None = None, labelled: str | None = None, alignment: int | None = None) -> Path:
    """A copy of a GGUF file through gguf.GGUFWriter, changing what a test needs changed:
    `tensor_type` re-encodes every 2-D weight as Q4_0 / Q8_0 (with gguf.quants.quantize) and
    `labelled` then names that type something else of the same block size (IQ4_NL for Q4_0),
    `drop_fields` leaves metadata keys out, `arch` renames general.architecture, `alignment` states
    general.alignment."""
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    old_arch = reader.fields["general.architecture"].contents()
    new_arch = arch or old_arch
    writer = GGUFWriter(target, new_arch)
    if alignment:
        writer.add_custom_alignment(alignment)
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

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 1)
    return _write_llama_vocab_gguf(target, tokens, scores, types, (sp.bos_id(), sp.eos_id(), sp.unk_id()), add_bos)


def write_llama_bpe_vocab_gguf(tokenizer_json: Path, target: Path, add_bos: bool = True) -> Path:
    """The same metadata-only GGUF from a sentencepiece-BPE tokenizer.json (Llama 2's, byte fallback), for
    when the tokenizer.model it was made from is not at hand. llama.cpp's "llama" tokenizer merges the
    adjacent pair whose joined piece scores highest; tokenizer.json ranks its merges instead, so a piece's
    score is minus the rank of the first merge that makes it (pieces no merge makes score -1e9: never
    preferred), which merges in the order Hugging Face does."""
    import json

    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        rank.setdefault("".join(merge.split(" ", 1) if isinstance(merge, str) else merge), i)
    special = {t["content"]: t["id"] for t in spec["added_tokens"] if t.get("special")}
    tokens = sorted(vocab, key=vocab.get)
    scores = [0.0 if len(t) == 1 or t in special else -float(rank.get(t, 1e9)) for t in tokens]
    types = [2 if t == "<unk>" else 3 if t in special else 6 if t.startswith("<0x") and len(t) == 6 else 1
             for t in tokens]
    return _write_llama_vocab_gguf(target, tokens, scores, types, (special["<s>"], special["</s>"], special["<unk>"]),
                                   add_bos)


def _write_llama_vocab_gguf(target: Path, tokens: list[str], scores: list[float], types: list[int],
                            bos_eos_unk: tuple[int, int, int], add_bos: bool) -> Path:
    from gguf import GGUFWriter

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
    writer.add_bos_token_id(bos_eos_unk[0])
    writer.add_eos_token_id(bos_eos_unk[1])
    writer.add_unk_token_id(bos_eos_unk[2])
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


# llama.cpp's tensor names (gguf-py/gguf/tensor_mapping.py), written out here independently of
# dllama/gguf_checkpoint.py's table so the tests check that table
LLAMA_CPP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LLAMA_CPP_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
}
LLAMA_CPP_EXPERT_NAMES = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight",
                          "down_proj": "ffn_down_exps.weight"}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes q and k."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_from_hf_folder(folder: Path, target: Path) -> Path:
    """What convert_hf_to_gguf.py writes for a Hugging Face folder (float32 tensors), enough for
    dllama: the {arch}.* metadata, the gpt2 tokenizer from tokenizer.json, tensors by llama.cpp's
    names (llama q/k permuted, each layer's experts stacked)."""
    from gguf import GGUFWriter

    from dllama.checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    c = ckpt.config
    arch = GGUF_ARCH[c["model_type"]]
    writer = GGUFWriter(target, arch)
    add_model_metadata(writer, c)
    _add_gpt2_tokenizer(writer, folder, c)
    for name, values in _llama_cpp_tensors(ckpt, arch):
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def add_model_metadata(writer, c: dict) -> None:
    """The {arch}.* keys convert_hf_to_gguf.py writes for a config.json."""
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_rope_freq_base(c["rope_theta"])
    if c.get("head_dim"):
        writer.add_key_length(c["head_dim"])
        writer.add_value_length(c["head_dim"])
    if c.get("num_experts"):
        writer.add_expert_count(c["num_experts"])
        writer.add_expert_used_count(c["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(c["moe_intermediate_size"])


def _add_gpt2_tokenizer(writer, folder: Path, config: dict) -> None:
    import json

    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"]) | {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = [piece for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["id"] for t in tok["added_tokens"]}
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_add_bos_token(bool(tokenizer_config.get("add_bos_token", False)))
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])


def _llama_cpp_tensors(ckpt, arch: str):
    c = ckpt.config
    yield "token_embd.weight", ckpt.get("model.embed_tokens.weight")
    for layer in range(c["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        for hf, gguf_name in LLAMA_CPP_LAYER_NAMES.items():
            if prefix + hf not in ckpt.entries:
                continue
            values = ckpt.get(prefix + hf)
            if arch == "llama" and hf.startswith("self_attn.q_proj"):
                values = llama_cpp_permute(values, c["num_attention_heads"])
            if arch == "llama" and hf.startswith("self_attn.k_proj"):
                values = llama_cpp_permute(values, c["num_key_value_heads"])
            yield f"blk.{layer}.{gguf_name}", values
        for hf, gguf_name in LLAMA_CPP_EXPERT_NAMES.items():
            experts = [n for n in ckpt.entries if n.startswith(f"{prefix}mlp.experts.") and n.endswith(f".{hf}.weight")]
            if experts:
                stacked = np.stack([ckpt.get(f"{prefix}mlp.experts.{e}.{hf}.weight") for e in range(len(experts))])
                yield f"blk.{layer}.{gguf_name}", stacked
    yield "output_norm.weight", ckpt.get("model.norm.weight")
    if "lm_head.weight" in ckpt.entries:
        yield "output.weight", ckpt.get("lm_head.weight")
