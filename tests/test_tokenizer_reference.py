"""Reference mode: the reference C++ runtime's tokenizer (FORMAT.md §4.1), its quirks pinned, and its ids
compared with the ids the reference's own compiled encoder gives."""
from __future__ import annotations

import pytest
from conftest import CONFORMANCE, require_fixtures
from tokenizer_helpers import train_byte_level_bpe

from dllama.formats import TokenizerFile, parse_tokenizer
from dllama.tokenizer import ReferenceRuntimeAbort, Tokenizer
from dllama.tokenizer.corpus import corpus
from dllama.tokenizer.cpp_tokenizer import detok_utf8
from dllama.tokenizer.from_hf import convert_tokenizer


def literal_c_encode(tf: TokenizerFile, text: str, add_bos: bool) -> list[int]:
    """Tokenizer::encode transliterated line by line (linear search instead of bsearch, which is
    the same on vocabularies without duplicate strings): the oracle for the fast encoder."""
    data = text.encode("utf-8")
    regular = {tf.tokens[i]: i for i in range(tf.bos_id)}
    special = list(range(tf.bos_id, tf.vocab_size))
    tokens = [tf.bos_id] if add_bos else []
    buffer = b""
    c = 0
    while c < len(data):
        hit = next((i for i in special if data.startswith(tf.tokens[i], c)), -1)
        if hit >= 0:
            tokens.append(hit)
            c += len(tf.tokens[hit])
            continue
        buffer += data[c:c + 1]
        c += 1
        if buffer in regular:
            tokens.append(regular[buffer])
            buffer = b""
    assert buffer == b""
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            tid = regular.get(tf.tokens[tokens[i]] + tf.tokens[tokens[i + 1]], -1)
            if tid != -1 and tf.scores[tid] > best_score:
                best_score, best_id, best_idx = tf.scores[tid], tid, i
        if best_idx == -1:
            return tokens
        tokens[best_idx:best_idx + 2] = [best_id]


@pytest.fixture(scope="module")
def trained_t(tmp_path_factory) -> TokenizerFile:
    folder = train_byte_level_bpe(tmp_path_factory.mktemp("ref") / "bl", tokenizer_config={"add_bos_token": True})
    return convert_tokenizer(folder)


@pytest.fixture
def tiny_t() -> TokenizerFile:
    return parse_tokenizer((require_fixtures(CONFORMANCE / "tiny-llama") / "expected.t").read_bytes())


@pytest.fixture(scope="module")
def reference_encoder(reference_dllama):
    from reference_runtime import build_encoder

    return build_encoder()


def reference_texts() -> list[str]:
    """The corpus, its special-token texts included, and texts that reach the encoder's corners."""
    return corpus() + ["", " ", "\n\n\t", "a" * 300, "é" * 50, "日本語のテキスト", "🦙🦙 emoji", "x\0cut here",
                       "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<s>[INST] hi [/INST]</s>"]


def with_duplicates(tf: TokenizerFile) -> TokenizerFile:
    """tf's regular pieces each repeated 1-4 times with other scores, after every single byte (so that any
    text is spelled): which copy an encoder finds decides both the id and the score of a merge."""
    import random

    rng = random.Random(31)
    tokens, scores = [], []
    for piece in [bytes([b]) for b in range(256)] + tf.tokens[:tf.bos_id]:
        for _ in range(rng.randint(1, 4)):
            tokens.append(piece)
            scores.append(-float(rng.randint(0, 1000)))
    return TokenizerFile(tokens=tokens + [b"<s>", b"</s>"], scores=scores + [0.0, 0.0], bos_id=len(tokens),
                         eos_ids=[len(tokens) + 1], add_bos=True)


def write_t(tf: TokenizerFile, path) -> str:
    path.write_bytes(tf.to_bytes())
    return str(path)


@pytest.mark.slow
def test_reference_mode_gives_the_reference_binarys_own_ids(reference_encoder, trained_t, tmp_path):
    """The ids the reference runtime feeds its model (its tokenizer.o, compiled with its source), for the
    whole corpus on six vocabularies: a byte-level BPE trained here, the two conformance ones, SmolLM2's
    (49152 tokens, the real merges), Llama 2's sentencepiece (bos_id 1 makes nearly every token special)
    and the trained one with each piece repeated (duplicate strings resolve through the C bsearch). Any rule
    of the encoder done differently fails here (tried: merging the rightmost of equal scores, a bsearch
    probing the upper middle)."""
    from conftest import SMOLLM2
    from reference_runtime import reference_encode

    vocabularies = {"trained": trained_t, "duplicates": with_duplicates(trained_t),
                    "smollm2": convert_tokenizer(SMOLLM2)}
    for name in ("tiny-llama", "tiny-qwen3"):
        vocabularies[name] = parse_tokenizer((require_fixtures(CONFORMANCE / name) / "expected.t").read_bytes())
    llama2 = require_fixtures() / "tokenizers" / "llama2"
    vocabularies["llama2"] = convert_tokenizer(llama2)
    texts = reference_texts()
    for name, tf in vocabularies.items():
        theirs = reference_encode(reference_encoder, write_t(tf, tmp_path / f"{name}.t"), texts)
        ours = Tokenizer.from_file(tf, mode="reference").encode_batch(texts)
        assert len(theirs) == len(texts)
        differing = [(t, o, r) for t, o, r in zip(texts, ours, theirs) if o != r]
        assert differing == [], (name, differing[:3])


def short_texts() -> list[str]:
    # the literal C loop is quadratic: keep its inputs short
    return [t for t in corpus() if len(t.encode()) <= 120]


def test_encoder_equals_the_literal_c_loop_on_the_corpus(trained_t, tiny_t):
    for tf in (trained_t, tiny_t):
        tok = Tokenizer.from_file(tf, mode="reference")
        texts = short_texts()
        assert len(texts) >= 300
        assert [t for t in texts if tok.encode(t) != literal_c_encode(tf, t, tf.add_bos)] == []


def test_llama2_bos_id_1_mangles_hello_world(llama2_tokenizer_dir):
    """bos_id 1 makes 31999 of 32000 tokens "special": every byte becomes its <0xNN> piece and
    nothing merges, where Hugging Face gives [1, 22557, 1526] ("▁Hello", "▁world")."""
    tok = Tokenizer.from_file(convert_tokenizer(llama2_tokenizer_dir), mode="reference")
    ids = tok.encode("Hello world")
    assert ids == [1] + [b + 3 for b in b"Hello world"]
    assert ids != [1, 22557, 1526]
    assert tok.decode(ids) == "Hello world"  # the bytes survive; the model sees garbage


def test_byte_level_bpe_merges_across_pre_tokenizer_boundaries(tiny_t):
    """No regex split: the four spaces before "return" merge into one token, where Hugging Face
    keeps three spaces apart and gives the fourth to " re"."""
    from tokenizers import Tokenizer as HF

    hf = HF.from_file(str(CONFORMANCE / "tiny-llama" / "tokenizer.json"))
    ref = Tokenizer.from_file(tiny_t, mode="reference").encode("    return x", add_bos=False)
    theirs = hf.encode("    return x").ids
    assert [tiny_t.tokens[i] for i in ref][:2] == [b"    ", b"re"]
    assert [tiny_t.tokens[i] for i in theirs][:3] == [b"  ", b" ", b" re"]


def test_reference_encoder_adds_bos_from_the_file(tiny_t):
    tok = Tokenizer.from_file(tiny_t, mode="reference")
    assert tok.encode("hi")[0] == 382 and tok.encode("hi", add_bos=False)[0] != 382
    tiny_t.add_bos = False
    assert Tokenizer.from_file(tiny_t, mode="reference").encode("hi")[0] != 382


# --------------------------------------------------------------------------------------------
# Hand-made vocabularies pin each rule of the C code

def vocab(tokens: list[bytes], scores: list[float] | None = None, bos_id: int | None = None) -> Tokenizer:
    tf = TokenizerFile(tokens=tokens, scores=scores or [0.0] * len(tokens),
                       bos_id=len(tokens) - 2 if bos_id is None else bos_id, eos_ids=[len(tokens) - 1], add_bos=False)
    return Tokenizer.from_file(tf, mode="reference")


def test_first_special_in_id_order_wins_not_the_longest():
    tok = vocab([b"a", b"b", b"ab", b"<s>", b"<s>a", b"</s>"], bos_id=3)
    assert tok.encode("<s>ab") == [3, 2]


def test_equal_scores_merge_the_leftmost_pair():
    tokens = [b"a", b"b", b"ab", b"ba", b"<s>", b"</s>"]
    assert vocab(tokens, [0, 0, -1, -1, 0, 0]).encode("aba") == [2, 0]
    assert vocab(tokens, [0, 0, -2, -1, 0, 0]).encode("aba") == [0, 3]


def test_a_merge_must_beat_minus_1e10():
    tokens = [b"a", b"b", b"ab", b"<s>", b"</s>"]
    assert vocab(tokens, [0, 0, -1e10, 0, 0]).encode("ab") == [0, 1]
    assert vocab(tokens, [0, 0, -9e9, 0, 0]).encode("ab") == [2]


def test_bytes_accumulate_until_they_form_a_regular_token():
    tok = vocab([b"\xc3\xa9", b"x", b"<s>", b"</s>"])
    assert tok.encode("xéx") == [1, 0, 1]


def test_text_the_regular_vocabulary_cannot_spell_aborts_like_the_c_assert():
    with pytest.raises(ReferenceRuntimeAbort, match="form no regular token"):
        vocab([b"a", b"<s>", b"</s>"]).encode("ab")


def test_duplicate_strings_resolve_as_glibc_bsearch_over_a_stable_sort():
    """Sentencepiece's "<0x20>" and "▁" both become b" ": the C code's bsearch picks one of them.
    glibc sorts stably (ids in order) and probes the middle (lo + hi) // 2 first."""
    assert vocab([b"a", b"a", b"<s>", b"</s>"]).encode("a") == [1]
    assert vocab([b"a", b"a", b"a", b"<s>", b"</s>"]).encode("a") == [1]
    assert vocab([b"b", b"a", b"a", b"a", b"a", b"<s>", b"</s>"]).encode("a") == [3]


def test_text_is_cut_at_a_nul_as_the_c_string_is():
    assert vocab([b"a", b"b", b"<s>", b"</s>"]).encode("a\0b") == [0]


# --------------------------------------------------------------------------------------------
# Decoding: buffered to valid utf-8, with the C recovery quirks

def test_decoder_buffers_a_character_split_across_tokens():
    tok = vocab([b"\xe6\x97", b"\xa5", b"a", b"<s>", b"</s>"])
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in (0, 1, 2)] == ["", "日", "a"]


def test_decoder_skips_bos_and_replaces_invalid_bytes():
    tok = vocab([b"\xff", b"a", b"<s>", b"</s>"])
    assert tok.decode([2, 1, 0, 1]) == "a\ufffda"


def test_invalid_bytes_at_the_end_stay_buffered_as_in_the_c_code():
    assert detok_utf8(b"a\xff") == (b"a", b"\xff")
    assert detok_utf8(b"\xe6\x97") == (b"", b"\xe6\x97")
    assert detok_utf8(b"\xe6a") == (b"\xef\xbf\xbda", b"")


def test_eos_returns_the_pending_bytes_raw():
    tok = vocab([b"\xe6\x97", b"a", b"<s>", b"</s>"])
    stream = tok.stream_decoder()
    assert stream.push(0) == "" and stream.push(3) == "\ufffd"  # C prints the raw partial bytes
