"""Tokenization for dllama: `.t` conversion (from_hf.py, from_gguf.py) and the runtime Tokenizer (core.py).

    from dllama.tokenizer import Tokenizer
    tok = Tokenizer.load("model.t", mode="faithful")   # or "reference"

The built-in test corpus is the submodule `dllama.tokenizer.corpus` (corpus.corpus()).
"""
from dllama.tokenizer.chat import ChatTemplateError
from dllama.tokenizer.core import InexactTokenizerWarning, Tokenizer, TokenizerError
from dllama.tokenizer.cpp_tokenizer import ReferenceRuntimeAbort

__all__ = ["Tokenizer", "TokenizerError", "ChatTemplateError", "InexactTokenizerWarning", "ReferenceRuntimeAbort"]
