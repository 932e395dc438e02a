"""Tokenizer parity with Hugging Face's tokenizer for the same GGUF, and chat-template checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_vocab

from pdserve.model.gguf_reader import read_gguf
from pdserve.model.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces,\n\ttabs and\r\nnewlines   ",
    "digits 1234567890 and 3.14159, prices $12.50",
    "<|im_start|>user\nliteral special tokens<|im_end|><|endoftext|>",
    "accents café naïve, CJK 中文字符, emoji 🤗👍🏽",
    "code: def f(x):\n    return x ** 2  # comment",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? 🤔"},
    ],
]


@pytest.fixture(scope="module")
def hf_tokenizer(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    # The tokenizer AutoTokenizer gives for this GGUF (same converter, same class); asked for by
    # class, so transformers skips a second GGUF parse for a config, which costs ~5 s.
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("hf-gguf")
    (directory / default_gguf.name).symlink_to(default_gguf)
    return PreTrainedTokenizerFast.from_pretrained(str(directory), gguf_file=default_gguf.name)


@pytest.fixture(scope="module")
def tokenizer(default_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(default_gguf))


def test_backend_is_the_one_transformers_builds(tokenizer, hf_tokenizer) -> None:
    ours = json.loads(tokenizer._backend.to_str())
    theirs = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    assert ours == theirs


def test_encode_decode_match_hf(tokenizer, hf_tokenizer) -> None:
    for text in TEXTS:
        ids = hf_tokenizer.encode(text)
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
        assert tokenizer.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids)
    assert tokenizer.encode("Hello world") == [19556, 905]  # no BOS for this model


def test_chat_template_matches_hf(tokenizer, hf_tokenizer) -> None:
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = hf_tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
            )
            assert tokenizer.apply_chat_template(messages, add_generation_prompt) == expected
    text = tokenizer.render_chat(CONVERSATIONS[0])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_special_ids_and_vocab(tokenizer, hf_tokenizer) -> None:
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152
    assert tokenizer.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_ids == (hf_tokenizer.eos_token_id,) == (2,)
    assert tokenizer.convert_ids_to_tokens([1, 2, 0]) == [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    ]


def test_save_and_reload_is_identical(tokenizer, tmp_path: Path) -> None:
    tokenizer.save(tmp_path)
    reloaded = Tokenizer.from_directory(tmp_path, bos_token_id=1, eos_token_ids=(2,))
    for text in TEXTS:
        assert reloaded.encode(text) == tokenizer.encode(text)
    for messages in CONVERSATIONS:
        assert reloaded.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    assert reloaded.special_tokens == tokenizer.special_tokens
    assert (reloaded.bos_token_id, reloaded.eos_token_ids) == (1, (2,))
    assert reloaded._backend.to_str() == tokenizer._backend.to_str()
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert all(isinstance(merge, str) for merge in saved["model"]["merges"])  # the fast form


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ({"role": "user", "content": "hi"}, "non-empty list"),
        (["hi"], r"messages\[0\] must be a dict"),
        ([{"role": "user"}], r"messages\[0\] is missing 'content'"),
        ([{"content": "hi"}], r"missing 'role'"),
        ([{"role": "user", "content": None}], r"messages\[0\]\['content'\] must be a str"),
        (
            [{"role": "user", "content": "a"}, {"role": 1, "content": "b"}],
            r"messages\[1\]\['role'\]",
        ),
    ],
)
def test_invalid_messages_raise_value_error(tiny_gguf, messages, match) -> None:
    tokenizer = Tokenizer.from_gguf(read_gguf(tiny_gguf.path))
    with pytest.raises(ValueError, match=match):
        tokenizer.apply_chat_template(messages)


def test_template_features_transformers_provides(tiny_gguf) -> None:
    template = (
        "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('bad role') }}"
        "{% endif %}{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}{{ bos_token }}"
    )
    base = Tokenizer.from_gguf(read_gguf(tiny_gguf.path))
    tokenizer = Tokenizer(base._backend, chat_template=template, special_tokens=base.special_tokens)
    text = tokenizer.render_chat([{"role": "user", "content": "<é>"}])
    assert text == '{"role": "user", "content": "<é>"}<|im_start|>'
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="bad role"):
        tokenizer.render_chat([{"role": "bad", "content": ""}])


def test_tiny_vocabulary_merges(tiny_gguf) -> None:
    tokenizer = Tokenizer.from_gguf(read_gguf(tiny_gguf.path))
    hello = tiny_gguf.tokens.index("hello")
    the = tiny_gguf.tokens.index("Ġthe")
    assert tokenizer.encode("hello the") == [hello, the]
    assert tokenizer.decode([hello, the, 2]) == "hello the"
    assert tokenizer.decode([hello, the, 2], skip_special_tokens=False) == "hello the<|im_end|>"


def test_a_token_in_raw_utf8_is_respelled_in_the_byte_alphabet() -> None:
    from pdserve.model.tokenizer import _byte_level_bpe_from_gguf, _bytes_to_unicode

    tokens, _types, merges = tiny_vocab()
    first, second, third = (_bytes_to_unicode()[b] for b in "中".encode())
    metadata = {
        "tokenizer.ggml.tokens": [*tokens, first + second, "中"],
        "tokenizer.ggml.merges": [*merges, f"{first} {second}", f"{first}{second} {third}"],
    }
    backend = _byte_level_bpe_from_gguf(metadata, {})
    assert backend.token_to_id(first + second + third) == len(tokens) + 1
    assert backend.token_to_id("中") is None
    assert backend.encode("hello 中").ids[-1] == len(tokens) + 1


def test_compact_form_keeps_a_vocabulary_that_spells_merges() -> None:
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import models

    from pdserve.model.tokenizer import _compact_json

    vocab = {"m": 0, "e": 1, "me": 2, "merges": 3, "a": 4, " ": 5, "b": 6, "a ": 7, "a b": 8}
    for merges, legacy in ([("m", "e")], True), ([("a", " "), ("a ", "b")], False):
        backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges))
        text = _compact_json(backend)
        assert BackendTokenizer.from_str(text).to_str() == backend.to_str()
        assert isinstance(json.loads(text)["model"]["merges"][0], str) == legacy
