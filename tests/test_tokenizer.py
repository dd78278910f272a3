"""Faithful tokenization equals Hugging Face's; streaming, chat, reconstruction, corpus, errors."""
from __future__ import annotations

import struct
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from conftest import CONFORMANCE, FIXTURES, require_fixtures
from tokenizer_helpers import train_byte_level_bpe, train_metaspace_unigram, train_sentencepiece

from dllama.formats import EmbeddedKind, EmbeddedSource, FormatError, TokenizerFile, parse_tokenizer
from dllama.tokenizer import ChatTemplateError, InexactTokenizerWarning, Tokenizer, TokenizerError
from dllama.tokenizer.corpus import SPECIAL, corpus
from dllama.tokenizer.from_hf import convert_tokenizer

SP_SPECIALS = ("<s>", "</s>", "<unk>")
CORPUS = corpus()


@dataclass
class Case:
    """Our faithful tokenizer beside what Hugging Face computes for the same folder."""

    tok: Tokenizer
    expected: Callable[[str], list[int]]     # Hugging Face's ids, bos included as transformers adds it
    round_trips: Callable[[str], bool]       # does Hugging Face's decode(encode(t)) give t back?
    texts: list[str]


def tokenizers_case(folder: Path, bos_by_config: bool) -> Case:
    """tokenizer.json: bos comes from the post-processor, or from add_bos_token when the
    post-processor adds none (transformers 5, as the conformance fixtures' ids show)."""
    from tokenizers import Tokenizer as HF

    hf = HF.from_file(str(folder / "tokenizer.json"))
    tok = Tokenizer.from_file(convert_tokenizer(folder))

    def expected(text: str) -> list[int]:
        ids = hf.encode(text, add_special_tokens=True).ids
        return [tok.bos_id] + ids if bos_by_config else ids

    def round_trips(text: str) -> bool:
        return hf.decode(hf.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text

    return Case(tok, expected, round_trips, CORPUS)


def sentencepiece_case(folder: Path) -> Case:
    """tokenizer.model: sentencepiece itself, bos first (LlamaTokenizer); texts with special
    tokens written in them are pinned separately below."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = Tokenizer.from_file(convert_tokenizer(folder))
    plain = [t for t in CORPUS if not any(s in t for s in SP_SPECIALS)]
    return Case(tok, lambda t: [sp.bos_id()] + sp.encode(t), lambda t: sp.decode(sp.encode(t)) == t, plain)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trained")


CASES = ("llama2", "byte_level", "byte_level_post_processor_and_config", "byte_level_post_processor_only",
         "sentencepiece_bpe", "sentencepiece_unigram", "metaspace_unigram_tokenizer_json")


@pytest.fixture(scope="module", params=CASES)
def case(request, trained) -> Case:
    name = request.param
    if name == "llama2":
        return tokenizers_case(require_fixtures(FIXTURES / "tokenizers" / "llama2"), bos_by_config=False)
    if name == "byte_level":
        return tokenizers_case(train_byte_level_bpe(trained / name, tokenizer_config={"add_bos_token": True}), True)
    if name == "byte_level_post_processor_and_config":  # Llama 3 style: must not add bos twice
        folder = train_byte_level_bpe(trained / name, llama3_split=True, bos_post_processor=True,
                                      tokenizer_config={"add_bos_token": True})
        return tokenizers_case(folder, bos_by_config=False)
    if name == "byte_level_post_processor_only":
        return tokenizers_case(train_byte_level_bpe(trained / name, bos_post_processor=True), bos_by_config=False)
    if name == "metaspace_unigram_tokenizer_json":
        return tokenizers_case(train_metaspace_unigram(trained / name), bos_by_config=True)
    if name == "sentencepiece_bpe":
        return sentencepiece_case(train_sentencepiece(trained / name, "bpe"))
    return sentencepiece_case(train_sentencepiece(trained / name, "unigram", normalization="nmt_nfkc",
                                                  tokenizer_config={"add_bos_token": True, "bos_token": "<s>"}))


# --------------------------------------------------------------------------------------------
# Faithful mode = Hugging Face

def test_faithful_ids_equal_hugging_face_on_the_corpus(case):
    assert case.tok.exact and len(case.texts) >= 300
    mismatches = [t for t in case.texts if case.tok.encode(t) != case.expected(t)]
    assert mismatches == []


def test_encode_batch_equals_encode(case):
    texts = case.texts[::7]
    assert case.tok.encode_batch(texts) == [case.tok.encode(t) for t in texts]


def test_decode_inverts_encode_wherever_hugging_face_round_trips(case):
    round_tripping = [t for t in case.texts if case.round_trips(t)]
    assert len(round_tripping) >= 250  # the check below must cover most of the corpus
    assert [t for t in round_tripping if case.tok.decode(case.tok.encode(t)) != t] == []


def test_add_bos_argument_overrides_the_file(case):
    text = "Hello world"
    plain = case.tok.encode(text, add_bos=False)
    assert case.tok.encode(text, add_bos=True) == [case.tok.bos_id] + plain
    assert plain and plain[0] != case.tok.bos_id


def test_bos_is_added_once_when_post_processor_and_config_both_ask(trained):
    folder = train_byte_level_bpe(trained / "double", bos_post_processor=True, tokenizer_config={"add_bos_token": True})
    tok = Tokenizer.from_file(convert_tokenizer(folder))
    ids = tok.encode("hi there")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


def test_add_bos_token_false_in_config_wins_over_the_post_processor(trained):
    folder = train_byte_level_bpe(trained / "nobos", bos_post_processor=True, tokenizer_config={"add_bos_token": False})
    tok = Tokenizer.from_file(convert_tokenizer(folder))
    assert not tok.add_bos and tok.bos_id not in tok.encode("hi there")


def test_special_tokens_written_in_text_are_recognised(trained):
    folder = train_byte_level_bpe(trained / "specials", tokenizer_config={"add_bos_token": True})
    tok = Tokenizer.from_file(convert_tokenizer(folder))
    eos = tok.eos_ids[0]
    ids = tok.encode("a<|eos|>b", add_bos=False)
    assert eos in ids and tok.decode(ids) == "a<|eos|>b"


def test_sentencepiece_splits_special_tokens_out_of_the_text_as_transformers_does(trained):
    import sentencepiece as spm

    folder = train_sentencepiece(trained / "sp_specials", "bpe")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = Tokenizer.from_file(convert_tokenizer(folder))
    bos, eos = sp.bos_id(), sp.eos_id()
    text = "Hello <s> world </s>"
    assert tok.encode(text) == [bos] + sp.encode("Hello ") + [bos] + sp.encode(" world ") + [eos]
    assert tok.decode(tok.encode(text)) == text


# --------------------------------------------------------------------------------------------
# Streaming

def test_stream_pieces_join_to_decode_and_are_never_broken(case):
    for text in case.texts[::3]:
        ids = case.tok.encode(text)
        decoder = case.tok.stream_decoder()
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        whole = case.tok.decode(ids)
        assert "".join(pieces) == whole, text
        if "\ufffd" not in whole:
            assert not any("\ufffd" in p for p in pieces), text


def test_stream_holds_byte_fallback_pieces_until_the_character_is_whole(llama2_tokenizer_dir):
    tok = Tokenizer.from_file(convert_tokenizer(llama2_tokenizer_dir))
    ids = tok.encode("🫠", add_bos=False)  # "▁" <0xF0> <0x9F> <0xAB> <0xA0>
    assert [tok.token_bytes(i) for i in ids[-4:]] == [bytes([b]) for b in "🫠".encode()]
    decoder = tok.stream_decoder()
    assert [decoder.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🫠"]


def test_stream_holds_multibyte_characters_split_across_byte_level_tokens(trained):
    tok = Tokenizer.from_file(convert_tokenizer(train_byte_level_bpe(trained / "stream",
                                                                     tokenizer_config={"add_bos_token": True})))
    text = "🧑🏿‍💻 and 日本語"
    ids = tok.encode(text, add_bos=False)
    assert any(not tok.token_bytes(i).decode("utf-8", "ignore") for i in ids)  # some token is part of a character
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert "" in pieces and not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == text


def test_stream_flush_gives_an_unfinished_character_as_replacement(llama2_tokenizer_dir):
    tok = Tokenizer.from_file(convert_tokenizer(llama2_tokenizer_dir))
    ids = tok.encode("🫠", add_bos=False)
    decoder = tok.stream_decoder()
    assert "".join(decoder.push(i) for i in ids[:-1]) == ""
    assert decoder.flush().endswith("\ufffd")


def test_eos_detection_covers_every_eos_id(conformance_dir):
    tf = parse_tokenizer((conformance_dir / "expected.t").read_bytes())
    tf.eos_ids = [383, 5]
    tok = Tokenizer.from_file(tf, mode="reference")
    assert tok.is_eos(383) and tok.is_eos(5) and not tok.is_eos(382) and tok.eos_ids == [383, 5]


# --------------------------------------------------------------------------------------------
# Chat templates

@pytest.fixture
def tiny_tok() -> Tokenizer:
    folder = require_fixtures(CONFORMANCE / "tiny-llama")
    return Tokenizer.from_file(convert_tokenizer(folder))


def test_render_chat_uses_the_stored_template(tiny_tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tiny_tok.render_chat(messages) == "<|bos|>user: hi\n<|bos|>assistant: hello\nassistant:"
    assert tiny_tok.render_chat(messages[:1], add_generation_prompt=False) == "<|bos|>user: hi\n"


LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def test_llama2_chat_template_renders_and_its_bos_text_encodes_to_the_bos_id(llama2_tokenizer_dir):
    tf = convert_tokenizer(llama2_tokenizer_dir)
    tf.chat_template = LLAMA2_CHAT
    tok = Tokenizer.from_file(tf)
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi "},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}]
    prompt = tok.render_chat(messages)
    assert prompt == "<s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST] yo </s><s>[INST] again [/INST]"
    ids = tok.encode(prompt, add_bos=False)  # as the server does: the template wrote the bos
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.render_chat(messages[1:2] * 2)


def test_render_chat_passes_hugging_face_variables_and_raise_exception():
    tf = TokenizerFile(tokens=[b"a", b"<s>", b"</s>"], scores=[0.0, 0.0, 0.0], bos_id=1, eos_ids=[2])
    tf.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}"
                        "{% endif %}{{ bos_token }}"
                        "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    tok = Tokenizer.from_file(tf, mode="reference")
    assert tok.render_chat([{"role": "user", "content": "x"}]) == "<s>x</s>"
    with pytest.raises(ChatTemplateError, match="first message must be user"):
        tok.render_chat([{"role": "system", "content": "x"}])


def test_render_chat_is_sandboxed_and_refuses_missing_templates():
    tf = TokenizerFile(tokens=[b"a", b"<s>"], scores=[0.0, 0.0], bos_id=1, eos_ids=[1],
                       chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        Tokenizer.from_file(tf, mode="reference").render_chat([{"role": "user", "content": "x"}])
    tf.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer.from_file(tf, mode="reference").render_chat([{"role": "user", "content": "x"}])


# --------------------------------------------------------------------------------------------
# Without the embedded tokenizer: a reconstruction, flagged as such

def agreement(tok: Tokenizer, case_expected: Callable[[str], list[int]], texts: list[str]) -> float:
    return sum(tok.encode(t) == case_expected(t) for t in texts) / len(texts)


def test_reconstruction_without_embedded_tokenizer_is_flagged_and_close(llama2_tokenizer_dir):
    from tokenizers import Tokenizer as HF

    hf = HF.from_file(str(llama2_tokenizer_dir / "tokenizer.json"))
    with pytest.warns(InexactTokenizerWarning, match="no embedded Hugging Face tokenizer"):
        tok = Tokenizer.from_file(convert_tokenizer(llama2_tokenizer_dir, embed=False))
    assert not tok.exact and "sentencepiece" in tok.approximation
    # measured 549/616: Llama 2 ranks its whitespace-run pieces last, which the .t cannot say
    assert agreement(tok, lambda t: hf.encode(t).ids, CORPUS) >= 0.85


def test_reference_converters_byte_level_t_reconstructs_to_hugging_face_ids(conformance_dir):
    """expected.t is the reference converter's output (no extension): for these byte-level
    vocabularies the rebuilt merges and guessed regex give Hugging Face's ids on the whole corpus."""
    from tokenizers import Tokenizer as HF

    hf = HF.from_file(str(conformance_dir / "tokenizer.json"))
    with pytest.warns(InexactTokenizerWarning):
        tok = Tokenizer.load(conformance_dir / "expected.t")
    assert agreement(tok, lambda t: [tok.bos_id] + hf.encode(t).ids, CORPUS) == 1.0


def test_reconstruction_of_sentencepiece_bpe_and_byte_level_bpe(trained):
    import sentencepiece as spm
    from tokenizers import Tokenizer as HF

    sp_folder = train_sentencepiece(trained / "rec_sp", "bpe")
    sp = spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    bl_folder = train_byte_level_bpe(trained / "rec_bl", tokenizer_config={"add_bos_token": True})
    hf = HF.from_file(str(bl_folder / "tokenizer.json"))
    plain = [t for t in CORPUS if not any(s in t for s in SP_SPECIALS)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InexactTokenizerWarning)
        sp_tok = Tokenizer.from_file(convert_tokenizer(sp_folder, embed=False))
        bl_tok = Tokenizer.from_file(convert_tokenizer(bl_folder, embed=False))
    assert agreement(sp_tok, lambda t: [sp.bos_id()] + sp.encode(t), plain) >= 0.95
    assert agreement(bl_tok, lambda t: [bl_tok.bos_id] + hf.encode(t).ids, CORPUS) >= 0.95


# --------------------------------------------------------------------------------------------
# The corpus

def test_corpus_is_deterministic_and_varied():
    from dllama.tokenizer import corpus as corpus_module  # how the validator finds it

    texts = corpus()
    assert texts == corpus() == corpus_module.texts() and len(texts) >= 300 and len(set(texts)) == len(texts)
    joined = "".join(texts)
    scripts = {"CYRILLIC", "GREEK", "ARABIC", "HEBREW", "CJK", "DEVANAGARI", "THAI", "HANGUL", "HIRAGANA", "LATIN"}
    seen = {word for ch in set(joined) for word in unicodedata.name(ch, "").split() if word in scripts}
    assert seen == scripts
    assert "\u200d" in joined and "\t\t" in joined and "\n\n\n" in joined and "        " in joined
    assert any(t.startswith("def ") and "\n    " in t for t in texts)
    assert all(s in texts for s in SPECIAL) and texts[-len(SPECIAL):] == SPECIAL  # special-token texts last


# --------------------------------------------------------------------------------------------
# Broken files and bad ids fail with a clear error

@pytest.fixture
def tiny_t() -> bytes:
    return (require_fixtures(CONFORMANCE / "tiny-llama") / "expected.t").read_bytes()


def load_bytes(tmp_path: Path, data: bytes, mode: str = "reference") -> Tokenizer:
    path = tmp_path / "broken.t"
    path.write_bytes(data)
    return Tokenizer.load(path, mode=mode)


def vocabulary_start(data: bytes) -> int:
    tf = parse_tokenizer(data)
    header_size = struct.unpack_from("<i", data, 4)[0]
    return header_size + len((tf.chat_template or "").encode()) + 4 * len(tf.eos_ids)


@pytest.mark.parametrize("cut", [3, 20, -1000, -1])
def test_truncated_file_is_refused(tiny_t, tmp_path, cut):
    with pytest.raises(FormatError, match="truncated"):
        load_bytes(tmp_path, tiny_t[:cut])


def test_bad_magic_is_refused(tiny_t, tmp_path):
    with pytest.raises(FormatError, match="bad magic"):
        load_bytes(tmp_path, struct.pack("<i", 0x1234) + tiny_t[4:])


def test_token_of_length_zero_is_refused(tiny_t, tmp_path):
    data = bytearray(tiny_t)
    struct.pack_into("<I", data, vocabulary_start(tiny_t) + 4, 0)
    with pytest.raises(FormatError, match="token 0 of length 0"):
        load_bytes(tmp_path, bytes(data))


@pytest.mark.parametrize("key,what", [(3, "bos_id"), (None, "eos id")])
def test_special_id_out_of_range_is_refused(tiny_t, tmp_path, key, what):
    data = bytearray(tiny_t)
    if key is not None:  # the header pair (3, bos_id) comes first
        struct.pack_into("<2i", data, 8, key, 384)
    else:
        struct.pack_into("<i", data, vocabulary_start(tiny_t) - 4, 999)
    with pytest.raises(FormatError, match=f"{what} .* outside the vocabulary of 384"):
        load_bytes(tmp_path, bytes(data))


@pytest.mark.parametrize("mode", ["faithful", "reference"])
def test_decoding_an_id_outside_the_vocabulary_is_refused(tiny_tok, mode):
    tok = Tokenizer.from_file(tiny_tok.tf, mode=mode)
    with pytest.raises(TokenizerError, match="token id 384 is outside the vocabulary of 384"):
        tok.decode([5, 384])
    with pytest.raises(TokenizerError, match="token id -1"):
        tok.stream_decoder().push(-1)


def test_an_embedded_tokenizer_that_does_not_fit_is_refused(tiny_tok, llama2_tokenizer_dir):
    tf = tiny_tok.tf
    foreign = (llama2_tokenizer_dir / "tokenizer.json").read_bytes()
    tf.embedded = [EmbeddedSource(EmbeddedKind.TOKENIZER_JSON, foreign)]
    with pytest.raises(TokenizerError, match="embeds a tokenizer of 32000 tokens but its vocabulary has 384"):
        Tokenizer.from_file(tf)
    tf.embedded = [EmbeddedSource(EmbeddedKind.TOKENIZER_JSON, b"{not json")]
    with pytest.raises(TokenizerError, match="embeds a tokenizer that cannot be loaded"):
        Tokenizer.from_file(tf)


def test_missing_file_and_unknown_mode_are_refused(tmp_path, tiny_tok):
    with pytest.raises(FormatError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.t")
    with pytest.raises(TokenizerError, match="unknown tokenizer mode 'fast'"):
        Tokenizer.from_file(tiny_tok.tf, mode="fast")


def test_encode_chat_adds_no_second_bos(tiny_tok):
    # the template writes "<|bos|>" itself; the file's add_bos must not add another
    ids = tiny_tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == tiny_tok.bos_id and ids.count(tiny_tok.bos_id) == 1
    assert tiny_tok.encode("user: hi\nassistant:", add_bos=True) == ids


def test_load_lets_go_of_the_parsed_json_but_a_handed_file_stays_whole(trained, tmp_path):
    """Tokenizer.load keeps no copy of the tokenizer.json text beside the parsed tokenizer (serve's memory);
    structured output still gets the JSON (from the backend), and a TokenizerFile handed to from_file is not
    changed, since its owner may still write it."""
    from dllama.runtime.structured import GrammarVocabulary

    tf = convert_tokenizer(train_byte_level_bpe(trained / "load", tokenizer_config={"add_bos_token": True}))
    path = tmp_path / "t.t"
    path.write_bytes(tf.to_bytes())
    loaded = Tokenizer.load(path)
    assert loaded.tf.embedded_source(EmbeddedKind.TOKENIZER_JSON) is None
    assert loaded.tf.embedded_source(EmbeddedKind.TOKENIZER_CONFIG) == tf.embedded_source(EmbeddedKind.TOKENIZER_CONFIG)
    assert loaded.encode("hello world") == Tokenizer.from_file(tf).encode("hello world")
    assert tf.embedded_source(EmbeddedKind.TOKENIZER_JSON) is not None
    assert GrammarVocabulary.of(loaded).vocab_size == loaded.vocab_size
