"""Small tokenizers trained in tests: byte-level BPE (tokenizers trainer) and sentencepiece
BPE / unigram (sentencepiece trainer), written as Hugging Face folders."""
from __future__ import annotations

import io
import json
from pathlib import Path

from dllama.tokenizer.corpus import corpus

BOS, EOS = "<|bos|>", "<|eos|>"
CHAT_TEMPLATE = ("{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def training_texts() -> list[str]:
    return [t for t in corpus() if t.strip()] * 2


def train_byte_level_bpe(folder: Path, vocab_size: int = 700, llama3_split: bool = False,
                         bos_post_processor: bool = False, tokenizer_config: dict | None = None) -> Path:
    """A GPT-2 style byte-level BPE; special tokens get the last ids, as in Llama 3 / Qwen."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    if llama3_split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_texts(), trainer=trainer)
    tok.add_special_tokens([BOS, EOS])
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    ids = {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS)}
    (folder / "config.json").write_text(json.dumps(ids))  # where the reference converter reads them
    if tokenizer_config is not None:
        config = {"bos_token": BOS, "eos_token": EOS, "chat_template": CHAT_TEMPLATE} | tokenizer_config
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def train_sentencepiece(folder: Path, model_type: str, vocab_size: int = 1000, normalization: str = "identity",
                        tokenizer_config: dict | None = None) -> Path:
    """A sentencepiece model with byte fallback (Llama 2 style: <unk> <s> </s>, then the 256 bytes)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_texts()), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, hard_vocab_limit=False, character_coverage=0.98, normalization_rule_name=normalization,
        remove_extra_whitespaces=normalization != "identity", num_threads=1, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def train_metaspace_unigram(folder: Path, vocab_size: int = 800) -> Path:
    """A tokenizer.json in sentencepiece's style (Metaspace, Unigram, NFKC) from tokenizers'
    SentencePieceUnigramTokenizer trainer: no byte fallback, bos from tokenizer_config."""
    from tokenizers import SentencePieceUnigramTokenizer

    tok = SentencePieceUnigramTokenizer()
    tok.train_from_iterator(training_texts(), vocab_size=vocab_size, show_progress=False,
                            special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
