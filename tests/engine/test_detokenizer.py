from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.detokenizer import (
    MAX_WINDOW_TOKENS,
    PROMPT_CONTEXT_TOKENS,
    DetokenizerUpdate,
    IncrementalDetokenizer,
    StoppedError,
    Tokenizer,
)
from pdserve.engine.sampling_params import SamplingParams

EOS = 0


class FakeTokenizer:
    """Token id -> bytes; decoding joins the bytes and replaces invalid UTF-8 with U+FFFD.

    `sentencepiece=True` drops the leading space of a decode, as Llama's tokenizer does, which
    is what the prompt context in IncrementalDetokenizer is for. Records what it decodes.
    """

    def __init__(self, pieces: Sequence[bytes | str], sentencepiece: bool = False):
        self.pieces = [p.encode() if isinstance(p, str) else p for p in pieces]
        self.sentencepiece = sentencepiece
        self.calls: list[int] = []  # number of ids per decode call

    def id(self, piece: bytes | str) -> int:
        return self.pieces.index(piece.encode() if isinstance(piece, str) else piece)

    def ids(self, *pieces: bytes | str) -> list[int]:
        return [self.id(p) for p in pieces]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.calls.append(len(token_ids))
        data = b"".join(
            b"</s>" if t == EOS else self.pieces[t]
            for t in token_ids
            if not (t == EOS and skip_special_tokens)
        )
        text = data.decode("utf-8", errors="replace")
        return text[1:] if self.sentencepiece and text.startswith(" ") else text


PIECES = [
    "<eos>",  # 0, special
    "Hel", "lo W", "orld", "STOP here", "x", "a", "b", "c", "d", "abcd", "#", "a#", "#b",
    "Hi", " there", " ", "o", "\ufffd",
    b"\xf0", b"\x9f", b"\x98", b"\x80", b"\xf0\x9f", b"\x98\x80!", b"\x80",
]  # fmt: skip


def run(tok, token_ids, prompt=(), finish=True, **params):
    """Feed tokens until a stop string matches; (deltas, stopped_by, detokenizer)."""
    detok = IncrementalDetokenizer(tok, list(prompt), SamplingParams(**params))
    deltas, stopped_by = [], None
    for t in token_ids:
        update = detok.add_token(t)
        deltas.append(update.text_delta)
        if update.stopped_by is not None:
            stopped_by = update.stopped_by
            break
    if finish:
        deltas.append(detok.finish())
    assert "".join(deltas) == detok.text
    return deltas, stopped_by, detok


@pytest.fixture
def tok():
    return FakeTokenizer(PIECES)


def test_fake_tokenizer_satisfies_protocol(tok):
    tokenizer: Tokenizer = tok  # type-checked against the Protocol
    assert tokenizer.decode(tok.ids("Hel", "lo W")) == "Hello W"


def test_plain_text_streams_token_by_token(tok):
    deltas, stopped_by, detok = run(tok, tok.ids("Hel", "lo W", "orld"))
    assert deltas == ["Hel", "lo W", "orld", ""]
    assert stopped_by is None and detok.text == "Hello World"


def test_emoji_split_over_four_tokens_is_held_until_complete(tok):
    ids = tok.ids("x", b"\xf0", b"\x9f", b"\x98", b"\x80", "x")
    deltas, _, detok = run(tok, ids)
    assert deltas == ["x", "", "", "", "\U0001f600", "x", ""]
    assert detok.text == "x\U0001f600x"


def test_emoji_split_with_trailing_text_in_same_token(tok):
    deltas, _, _ = run(tok, tok.ids(b"\xf0\x9f", b"\x98\x80!"))
    assert deltas == ["", "\U0001f600!", ""]


def test_finish_flushes_an_incomplete_character(tok):
    ids = tok.ids("x", b"\xf0\x9f")
    deltas, _, detok = run(tok, ids)
    assert deltas == ["x", "", "\ufffd"]
    assert detok.text == tok.decode(ids)


def test_invalid_bytes_do_not_hold_the_window_forever(tok):
    ids = tok.ids("x") + [tok.id(b"\x80")] * (3 * MAX_WINDOW_TOKENS)
    tok.calls.clear()
    deltas, _, detok = run(tok, ids)
    assert max(tok.calls) <= 2 * MAX_WINDOW_TOKENS
    assert detok.text == tok.decode(ids)
    assert sum(1 for d in deltas if d) >= 3  # released in pieces, not all at the end


def test_genuine_replacement_character_is_emitted(tok):
    deltas, _, detok = run(tok, tok.ids("x", "\ufffd", "x"))
    assert detok.text == "x\ufffdx" and deltas[-1] == ""


def test_stop_string_spanning_tokens(tok):
    deltas, stopped_by, detok = run(tok, tok.ids("Hel", "lo W", "orld"), stop=["o Wo"])
    # "o W" could start "o Wo", so it is held back; then the stop string completes.
    assert deltas == ["Hel", "l", "", ""]
    assert stopped_by == "o Wo" and detok.text == "Hell"


def test_stop_string_at_the_very_first_token(tok):
    deltas, stopped_by, detok = run(tok, tok.ids("STOP here", "x"), stop="STOP")
    assert deltas == ["", ""] and stopped_by == "STOP" and detok.text == ""


def test_overlapping_stop_strings_shortest_completion_wins(tok):
    _, stopped_by, detok = run(tok, tok.ids("x", "a", "b", "c"), stop=["abc", "ab"])
    assert stopped_by == "ab" and detok.text == "x"


@pytest.mark.parametrize("pieces", [["abcd"], ["a", "b", "c", "d"]])
def test_earliest_completed_stop_wins_however_tokenized(tok, pieces):
    # "bc" is complete before "abcd" is, whether the text arrives at once or char by char.
    _, stopped_by, detok = run(tok, tok.ids("x", *pieces), stop=["abcd", "bc"])
    assert stopped_by == "bc" and detok.text == "xa"


def test_same_end_longest_stop_wins(tok):
    _, stopped_by, detok = run(tok, tok.ids("x", "a", "b", "c"), stop=["bc", "abc"])
    assert stopped_by == "abc" and detok.text == "x"


def test_held_back_text_released_when_the_stop_does_not_complete(tok):
    deltas, stopped_by, detok = run(tok, tok.ids("a#", "#b"), stop="###")
    assert deltas == ["a", "##b", ""]
    assert stopped_by is None and detok.text == "a##b"


def test_finish_releases_held_back_text(tok):
    deltas, stopped_by, detok = run(tok, tok.ids("a", "#"), stop="##")
    assert deltas == ["a", "", "#"] and stopped_by is None and detok.text == "a#"


def test_after_stop_finish_is_empty_and_add_token_raises(tok):
    _, _, detok = run(tok, tok.ids("x", "a", "b"), stop="ab", finish=False)
    assert detok.stopped_by == "ab"
    assert detok.finish() == ""
    with pytest.raises(StoppedError):
        detok.add_token(tok.id("x"))


def test_add_token_after_finish_raises(tok):
    _, _, detok = run(tok, tok.ids("x"))
    with pytest.raises(StoppedError):
        detok.add_token(tok.id("x"))


@pytest.mark.parametrize("skip, expected", [(True, "xx"), (False, "x</s>x")])
def test_special_tokens(tok, skip, expected):
    _, _, detok = run(tok, [tok.id("x"), EOS, tok.id("x")], skip_special_tokens=skip)
    assert detok.text == expected


def test_stop_string_spanning_a_skipped_special_token(tok):
    _, stopped_by, detok = run(tok, [tok.id("a"), EOS, tok.id("b")], stop="ab")
    assert stopped_by == "ab" and detok.text == ""


def test_prompt_context_keeps_the_leading_space():
    sp = FakeTokenizer(PIECES, sentencepiece=True)
    prompt = sp.ids("Hi")
    assert sp.decode(sp.ids(" there")) == "there"  # why the prompt context is needed
    deltas, _, detok = run(sp, sp.ids(" there", " ", "x"), prompt=prompt)
    assert deltas == [" there", " ", "x", ""] and detok.text == " there x"


def test_cost_per_token_is_bounded_by_the_window(tok):
    ids = tok.ids("Hel", "lo W", "orld") * 500 + tok.ids(b"\xf0", b"\x9f", b"\x98", b"\x80")
    tok.calls.clear()
    _, _, detok = run(tok, ids, prompt=tok.ids("x") * 50, stop=["zzz", "Worlds"])
    assert max(tok.calls) <= max(PROMPT_CONTEXT_TOKENS, MAX_WINDOW_TOKENS) + MAX_WINDOW_TOKENS
    assert len(tok.calls) <= 2 * len(ids) + 2
    assert detok.text == tok.decode(ids)


def test_update_is_a_value():
    assert DetokenizerUpdate("a") == DetokenizerUpdate("a", None)


# -- a real byte-level BPE, trained here on a few sentences ------------------------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, general Kenobi.",
    "Café naïve résumé: déjà vu, über-cool façade.",
    "日本語のテキストも少し。東京タワー。",
    "Emoji party 🎉😀👍🏽 and flags 🇫🇷 too 😀😀.",
    "def main():\n    return 42  # the answer\n",
] * 20


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer as BPETokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = BPETokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return tokenizer


texts = st.text(
    alphabet=st.sampled_from(list("abcdeo H!.\n#é日本😀🎉👍🏽🇫🇷ü") + ["\U0001f600"]),
    min_size=0,
    max_size=40,
)


def first_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """Oracle: the text before the stop string that completes first (then the longest)."""
    found = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not found:
        return text, None
    end, neg_len, stop = min(found)
    return text[: end + neg_len], stop


def test_bpe_splits_emoji_into_several_tokens(bpe):
    ids = bpe.encode("👍🏽").ids
    assert len(ids) > 1
    assert any("\ufffd" in bpe.decode(ids[:i]) for i in range(1, len(ids)))


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_bpe_deltas_concatenate_to_the_text(bpe, text):
    ids = bpe.encode(text).ids
    deltas, stopped_by, detok = run(bpe, ids, prompt=bpe.encode("Hello world").ids)
    assert stopped_by is None
    assert detok.text == text == bpe.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=300, deadline=None)
@given(text=texts, data=st.data())
def test_bpe_stop_strings_match_the_oracle(bpe, text, data):
    # Stop strings: pieces of the text itself (so they do occur) and random ones.
    pieces = []
    for _ in range(data.draw(st.integers(1, 3))):
        if text and data.draw(st.booleans()):
            start = data.draw(st.integers(0, len(text) - 1))
            pieces.append(text[start : data.draw(st.integers(start + 1, len(text)))])
        else:
            pieces.append(data.draw(texts.filter(bool)))
    expected_text, expected_stop = first_stop(text, pieces)
    deltas, stopped_by, detok = run(bpe, bpe.encode(text).ids, stop=pieces)
    assert (detok.text, stopped_by) == (expected_text, expected_stop)
    assert all("\ufffd" not in d for d in deltas)


def test_transformers_fast_tokenizer_works_too(bpe):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)
    text = "Hello there 😀! Café."
    ids = hf.encode(text)
    _, stopped_by, detok = run(hf, ids, stop="!")
    assert stopped_by == "!" and detok.text == "Hello there 😀"
