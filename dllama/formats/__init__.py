"""The one owner of the distributed-llama file formats (docs/FORMAT.md).

Everything that reads or writes `.m` / `.t` bytes goes through this package; nobody repeats a
magic number. One module per part of the format:

    codecs          float types and the block table: values per block, bytes, q40/q80/f16/f32 codecs (§1.2)
    header          the `.m` header: keys, their order, ModelHeader (§1, §1.1)
    model_file      the tensor plan, its layout, and ModelFile, the memory-mapped `.m` (§1.3, §3)
    tokenizer_file  the `.t` file and our extension after its vocabulary (§4, docs/FORMAT.md)
    atomic          writing a file without leaving half of it behind

`from dllama.formats import X` works for every name below.
"""
from __future__ import annotations

from dllama.errors import FormatError
from dllama.formats.atomic import atomic_output
from dllama.formats.codecs import (
    BLOCK_FORMATS,
    BLOCK_SIZE,
    Q40_BLOCK,
    Q40_BYTES,
    Q80_BLOCK,
    Q80_BYTES,
    SCALE_BYTES,
    BlockFormat,
    FloatType,
    decode_tensor,
    dequantize_q40,
    dequantize_q80,
    encode_tensor,
    quantize_q40,
    quantize_q80,
    tensor_nbytes,
)
from dllama.formats.header import (
    DEFAULTED_KEYS,
    FIELD_BY_KEY,
    HEADER_LIMITS,
    MODEL_MAGIC,
    NORM_EPSILON_CODES,
    OLD_MODEL_MAGICS,
    OPTIONAL_KEY_ORDER,
    REQUIRED_KEY_ORDER,
    ArchType,
    HeaderKey,
    HiddenAct,
    ModelHeader,
    RopeType,
    check_header_limits,
    parse_model_header,
    read_model_header,
)
from dllama.formats.model_file import (
    FileRows,
    ModelFile,
    Split,
    TensorLayout,
    TensorSpec,
    model_file_size,
    permute_rotary_rows,
    tensor_layout,
    tensor_plan,
)
from dllama.formats.tokenizer_file import (
    EXTENSION_MAGIC,
    EXTENSION_VERSION,
    OLD_TOKENIZER_MAGIC,
    TOKENIZER_MAGIC,
    EmbeddedKind,
    EmbeddedSource,
    TokenizerFile,
    TokKey,
    padded_vocabulary,
    parse_tokenizer,
    read_tokenizer,
    vocabulary_end,
)

__all__ = [
    "FormatError", "atomic_output",
    "BLOCK_FORMATS", "BLOCK_SIZE", "Q40_BLOCK", "Q40_BYTES", "Q80_BLOCK", "Q80_BYTES", "SCALE_BYTES", "BlockFormat",
    "FloatType", "decode_tensor", "dequantize_q40", "dequantize_q80", "encode_tensor", "quantize_q40",
    "quantize_q80", "tensor_nbytes",
    "DEFAULTED_KEYS", "FIELD_BY_KEY", "MODEL_MAGIC", "NORM_EPSILON_CODES", "OLD_MODEL_MAGICS", "OPTIONAL_KEY_ORDER",
    "REQUIRED_KEY_ORDER", "ArchType", "HeaderKey", "HiddenAct", "ModelHeader", "RopeType", "parse_model_header",
    "HEADER_LIMITS", "check_header_limits",
    "read_model_header",
    "FileRows", "ModelFile", "Split", "TensorLayout", "TensorSpec", "model_file_size", "permute_rotary_rows",
    "tensor_layout", "tensor_plan",
    "EXTENSION_MAGIC", "EXTENSION_VERSION", "OLD_TOKENIZER_MAGIC", "TOKENIZER_MAGIC", "EmbeddedKind",
    "EmbeddedSource", "TokenizerFile", "TokKey", "padded_vocabulary", "parse_tokenizer", "read_tokenizer",
    "vocabulary_end",
]
