"""The Tokenizer facade's edges (dllama/tokenizer/core.py, faithful.py) a mutation run found unchecked
(docs/TESTING.md): the special tokens a tokenizer_config.json declares for a sentencepiece model,
what a chat template is given, the add_bos of batches and chats, and what errors and repr name."""
from __future__ import annotations

import io
import json

import pytest
from conftest import CONFORMANCE, require_fixtures
from tokenizer_helpers import training_texts

from dllama.formats import EmbeddedKind, EmbeddedSource, TokenizerFile
from dllama.tokenizer import InexactTokenizerWarning, Tokenizer, TokenizerError
from dllama.tokenizer.from_hf import convert_tokenizer


@pytest.fixture(scope="module")
def sp_with_user_symbols(tmp_path_factory):
    """A sentencepiece model (Llama 2's kind) with user-defined pieces that tokenizer_config.json
    declares special in each of its two ways; "<tool>" is a prefix of "<tool>_call>"."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_texts()), model_writer=model, vocab_size=1000, model_type="bpe",
        byte_fallback=True, hard_vocab_limit=False, character_coverage=0.98, normalization_rule_name="identity",
        user_defined_symbols=["<tool>", "<tool>_call>", "<plain>"], num_threads=1, minloglevel=2)
    folder = tmp_path_factory.mktemp("sp_user")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    config = {"additional_special_tokens": ["<tool>", {"content": "<tool>_call>"}, "<not-a-piece>"],
              "added_tokens_decoder": {"0": {"content": "<unk>"}, "7": {"content": ""}}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_file(convert_tokenizer(folder)), sp


def test_config_declared_specials_are_split_out_longest_first(sp_with_user_symbols):
    tok, sp = sp_with_user_symbols
    call, tool = sp.piece_to_id("<tool>_call>"), sp.piece_to_id("<tool>")
    # transformers (legacy LlamaTokenizer): each text between specials is encoded on its own
    assert tok.encode("Hello<tool>_call>x<tool>y", add_bos=False) == \
        sp.encode("Hello") + [call] + sp.encode("x") + [tool] + sp.encode("y")
    # a user-defined piece the config does not declare stays inside the text sentencepiece encodes
    assert tok.encode("a<plain>b", add_bos=False) == sp.encode("a<plain>b")
    # a declared text that is no piece of the model is plain text
    assert tok.encode("a<not-a-piece>b", add_bos=False) == sp.encode("a<not-a-piece>b")
    assert tok.decode(tok.encode("Hello<tool>_call>x", add_bos=False)) == "Hello<tool>_call>x"


@pytest.mark.parametrize("mode", ["faithful", "reference"])
def test_batches_and_chats_honour_add_bos_and_the_generation_prompt(mode):
    tok = Tokenizer.from_file(convert_tokenizer(require_fixtures(CONFORMANCE / "tiny-llama")), mode)
    texts = ["Hello world", "one more"]
    assert tok.encode_batch(texts, add_bos=False) == [tok.encode(t, add_bos=False) for t in texts]
    assert tok.encode_batch(texts, add_bos=True) == [tok.encode(t, add_bos=True) for t in texts]
    assert tok.encode_batch(texts, add_bos=False)[0][0] != tok.bos_id
    messages = [{"role": "user", "content": "hi"}]
    assert tok.encode_chat(messages, add_generation_prompt=False) == \
        tok.encode(tok.render_chat(messages, add_generation_prompt=False), add_bos=False)
    assert tok.encode_chat(messages) != tok.encode_chat(messages, add_generation_prompt=False)


def with_config(tf: TokenizerFile, config: dict) -> TokenizerFile:
    tf.embedded = [EmbeddedSource(EmbeddedKind.TOKENIZER_CONFIG, json.dumps(config).encode())]
    return tf


def test_a_template_gets_the_configs_special_texts_and_the_callers_variables():
    tf = with_config(TokenizerFile(tokens=[b"<s>", b"</s>", b"a"], scores=[0.0] * 3, bos_id=0, eos_ids=[1]),
                     {"bos_token": {"content": "<B>"}, "eos_token": "<E>", "pad_token": "<P>",
                      "unk_token": {"content": "<U>"}})
    tf.chat_template = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ mask_token }}|{{ tools }}"
    tok = Tokenizer.from_file(tf, mode="reference")
    assert tok.render_chat([], tools="T") == "<B>|<E>|<P>|<U>||T"


def test_without_config_a_template_gets_the_vocabularys_texts():
    tf = TokenizerFile(tokens=[b"<s>", b"\xff</s>", b"a"], scores=[0.0] * 3, bos_id=0, eos_ids=[1],
                       chat_template="{{ bos_token }}|{{ eos_token }}")
    tok = Tokenizer.from_file(tf, mode="reference")
    assert tok.render_chat([]) == "<s>|\ufffd</s>"   # id 0 is a token too; bytes that are not utf-8 replaced
    tf.eos_ids = []
    assert Tokenizer.from_file(tf, mode="reference").render_chat([]) == "<s>|"


def test_errors_and_repr_name_the_file_and_the_mode(tmp_path):
    tf = convert_tokenizer(require_fixtures(CONFORMANCE / "tiny-llama"))
    path = tmp_path / "tiny.t"
    path.write_bytes(tf.to_bytes())
    for mode in ("faithful", "reference"):
        tok = Tokenizer.load(path, mode)
        assert tok.mode == mode
        assert repr(tok) == f"Tokenizer({str(path)!r}, mode={mode!r}, vocab_size={tf.vocab_size}, exact)"
        with pytest.raises(TokenizerError, match=f"outside the vocabulary of {tf.vocab_size} tokens in {path}"):
            tok.decode([tf.vocab_size])
    tf.embedded = []
    with pytest.warns(InexactTokenizerWarning, match="may differ from the original; reconvert with dllama-convert "
                                                     "to embed it$"):
        rebuilt = Tokenizer.from_file(tf)
    assert repr(rebuilt).endswith("approximate)")
