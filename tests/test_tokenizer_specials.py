"""The Tokenizer facade's edges (dllama/tokenizer/core.py, faithful.py) a mutation run found unchecked
(docs/TESTING.md): the special tokens a tokenizer_config.json declares for a sentencepiece model,
what a chat template is given, the add_bos of batches and chats, and what errors and repr name."""
from __future__ import annotations

import io
import json

import pytest
from conftest import CONFORMANCE, require_fixtures
from tokenizer_helpers import BOS, EOS, train_byte_level_bpe, train_sentencepiece, training_texts

from dllama.formats import EmbeddedKind, EmbeddedSource, TokenizerFile
from dllama.tokenizer import InexactTokenizerWarning, Tokenizer, TokenizerError
from dllama.tokenizer.chat import ChatTemplateError
from dllama.tokenizer.from_hf import convert_tokenizer


@pytest.fixture(scope="module")
def sp_with_user_symbols(tmp_path_factory):
    """A sentencepiece model (Llama 2's kind) with user-defined pieces that tokenizer_config.json
    declares special in each of its two ways ("<dec>" only in added_tokens_decoder, "<plain>" there
    only as a bare string, which declares nothing); "<tool>" is a prefix of "<tool>_call>"."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_texts()), model_writer=model, vocab_size=1000, model_type="bpe",
        byte_fallback=True, hard_vocab_limit=False, character_coverage=0.98, normalization_rule_name="identity",
        user_defined_symbols=["<tool>", "<tool>_call>", "<plain>", "<dec>"], num_threads=1, minloglevel=2)
    folder = tmp_path_factory.mktemp("sp_user")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    config = {"additional_special_tokens": ["<tool>", {"content": "<tool>_call>"}, "<not-a-piece>"],
              "added_tokens_decoder": {"0": {"content": "<unk>"}, "7": {"content": ""}, "8": "<plain>",
                                       "9": {"content": "<dec>"}}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_file(convert_tokenizer(folder)), sp


def test_config_declared_specials_are_split_out_longest_first(sp_with_user_symbols):
    tok, sp = sp_with_user_symbols
    call, tool = sp.piece_to_id("<tool>_call>"), sp.piece_to_id("<tool>")
    # transformers (legacy LlamaTokenizer): each text between specials is encoded on its own
    assert tok.encode("Hello<tool>_call>x<tool>y", add_bos=False) == \
        sp.encode("Hello") + [call] + sp.encode("x") + [tool] + sp.encode("y")
    # added_tokens_decoder alone declares a special too
    assert tok.encode("x<dec>y", add_bos=False) == sp.encode("x") + [sp.piece_to_id("<dec>")] + sp.encode("y")
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


def test_a_tokenizer_config_that_is_no_object_is_ignored():
    tf = TokenizerFile(tokens=[b"<s>", b"</s>", b"a"], scores=[0.0] * 3, bos_id=0, eos_ids=[1],
                       chat_template="{{ bos_token }}|{{ eos_token }}")
    tf.embedded = [EmbeddedSource(EmbeddedKind.TOKENIZER_CONFIG, b'["<B>"]')]
    assert Tokenizer.from_file(tf, mode="reference").render_chat([]) == "<s>|</s>"


def test_without_config_a_template_gets_the_vocabularys_texts():
    tf = TokenizerFile(tokens=[b"<s>", b"\xff</s>", b"a"], scores=[0.0] * 3, bos_id=0, eos_ids=[1],
                       chat_template="{{ bos_token }}|{{ eos_token }}")
    tok = Tokenizer.from_file(tf, mode="reference")
    assert tok.render_chat([]) == "<s>|\ufffd</s>"   # id 0 is a token too; bytes that are not utf-8 replaced
    tf.eos_ids = []
    assert Tokenizer.from_file(tf, mode="reference").render_chat([]) == "<s>|"
    tf.bos_id = 3   # one past the vocabulary: no text
    assert Tokenizer.from_file(tf, mode="reference").render_chat([]) == "|"
    tf.chat_template = None
    with pytest.raises(ChatTemplateError, match="^tokenizer file has no chat template; convert a model whose "
                                                "tokenizer_config.json has chat_template, or send plain completions$"):
        Tokenizer.from_file(tf, mode="reference").render_chat([])


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


@pytest.fixture(scope="module")
def byte_level_folder(tmp_path_factory):
    return train_byte_level_bpe(tmp_path_factory.mktemp("bl"))


def with_post_processor(folder, single: str, out):
    """The folder's tokenizer.json with a post-processor that writes `single` around a text."""
    import shutil

    from tokenizers import Tokenizer as HF
    from tokenizers import processors

    shutil.copytree(folder, out)
    hf = HF.from_file(str(out / "tokenizer.json"))
    specials = [(t, hf.token_to_id(t)) for t in (BOS, EOS) if t in single]
    hf.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    hf.save(str(out / "tokenizer.json"))
    return hf, out


def test_the_post_processors_bos_and_eos_win_over_the_t_files(byte_level_folder, tmp_path):
    hf, folder = with_post_processor(byte_level_folder, f"{BOS} $A {EOS}", tmp_path / "both")
    tf = convert_tokenizer(folder)
    tf.bos_id, tf.eos_ids = 3, [4]   # what Hugging Face adds is the post-processor's, whatever the .t says
    tok = Tokenizer.from_file(tf)
    for text in ("hi there", "Hello world"):
        assert tok.encode(text) == hf.encode(text).ids
    assert tok.encode("hi", add_bos=False)[-1] != hf.token_to_id(EOS)   # an explicit add_bos: the text alone
    # decoding drops the bos the post-processor put first (not the .t's id 3), and writes the eos
    assert tok.decode(tok.encode("hi there")) == hf.decode(hf.encode("hi there").ids[1:], skip_special_tokens=False)


def test_a_post_processor_that_only_appends_an_eos_adds_no_bos(byte_level_folder, tmp_path):
    hf, folder = with_post_processor(byte_level_folder, f"$A {EOS}", tmp_path / "eos_only")
    tok = Tokenizer.from_file(convert_tokenizer(folder))
    assert not tok.add_bos
    for text in ("hi there", "Hello world"):
        assert tok.encode(text) == hf.encode(text).ids and tok.encode(text)[-1] == hf.token_to_id(EOS)


def test_a_t_file_without_eos_ids_still_tokenizes_like_its_tokenizer_json(byte_level_folder):
    from tokenizers import Tokenizer as HF

    tf = convert_tokenizer(byte_level_folder)
    tf.eos_ids = []
    hf = HF.from_file(str(byte_level_folder / "tokenizer.json"))
    assert Tokenizer.from_file(tf).encode("hi there") == hf.encode("hi there").ids


def test_add_eos_token_in_the_config_appends_the_eos(byte_level_folder, tmp_path):
    import shutil

    shutil.copytree(byte_level_folder, tmp_path / "eos")
    (tmp_path / "eos" / "tokenizer_config.json").write_text(json.dumps({"add_eos_token": True, "eos_token": EOS}))
    tok = Tokenizer.from_file(convert_tokenizer(tmp_path / "eos"))
    assert tok.encode("hi there")[-1] == tok.eos_ids[0] and tok.encode("hi there")[:-1] == tok.encode("hi there",
                                                                                                       add_bos=False)
    sp_folder = train_sentencepiece(tmp_path / "sp_eos", "bpe", tokenizer_config={"add_eos_token": True})
    sp_tok = Tokenizer.from_file(convert_tokenizer(sp_folder))
    assert sp_tok.encode("hi there")[-1] == sp_tok.eos_ids[0]


def test_an_embedded_tokenizer_that_cannot_load_is_named_with_the_fix(tmp_path):
    tf = TokenizerFile(tokens=[b"a", b"b"], scores=[0.0, 0.0], bos_id=0, eos_ids=[1],
                       embedded=[EmbeddedSource(EmbeddedKind.TOKENIZER_JSON, b"{not json")])
    with pytest.raises(TokenizerError, match=r"^tokenizer file embeds a tokenizer that cannot be loaded \(.*\); "
                                             "reconvert it with dllama-convert$"):
        Tokenizer.from_file(tf)
    path = tmp_path / "broken.t"
    path.write_bytes(tf.to_bytes())
    with pytest.raises(TokenizerError, match=f"^{path} embeds a tokenizer that cannot be loaded"):
        Tokenizer.load(path)


def test_a_tokenizer_is_faithful_unless_told_otherwise():
    tf = convert_tokenizer(require_fixtures(CONFORMANCE / "tiny-llama"))
    tok = Tokenizer(tf)
    assert tok.mode == "faithful" and tok.exact
    assert tok.encode("Hello world") == Tokenizer(tf, "faithful").encode("Hello world")


def test_reference_mode_adds_the_t_files_bos_and_decodes_and_streams_the_text():
    tf = convert_tokenizer(require_fixtures(CONFORMANCE / "tiny-llama"))
    assert tf.add_bos
    tok = Tokenizer.from_file(tf, "reference")
    text = "Hello world, ok?"
    ids = tok.encode(text)
    assert ids == [tf.bos_id] + tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text
