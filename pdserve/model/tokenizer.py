"""Tokenizer: a `tokenizers.Tokenizer` plus the chat template, behaving as Hugging Face's does.

Built from a GGUF's vocabulary (byte-level BPE is rebuilt here directly, exactly as
transformers' GGUF converter builds it, without transformers' slow GGUF reader; any other
GGUF tokenizer type goes through transformers itself) or from a Hugging Face directory
(`tokenizer.json` + `tokenizer_config.json` [+ `chat_template.jinja`]). `save()` writes the
same two files, so a cached tokenizer reloads in milliseconds with `tokenizers` alone.

Chat templates render in the same sandboxed jinja2 environment transformers uses (trim_blocks,
lstrip_blocks, loopcontrols, the same `tojson`, `raise_exception`, `strftime_now`), with the
special-token strings as template variables, and the result is tokenized without adding
special tokens, as `apply_chat_template(..., tokenize=True)` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

if TYPE_CHECKING:
    from pdserve.model.gguf_reader import GGUFFile

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

# `tokenizer.ggml.pre` values whose merges were learned on Llama-3-style splits; the same table
# transformers' GGUF converter applies. Any other value keeps plain GPT-2 byte-level splitting.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    name: _LLAMA3_SPLIT
    for name in (
        "llama3",
        "llama-v3",
        "llama-bpe",
        "falcon3",
        "falcon-h1",
        "pixtral",
        "midm-2.0",
        "lfm2",
        "jina-v5-nano",
        "dbrx",
        "smaug-bpe",
    )
}


class Tokenizer:
    """Text <-> token ids for one model. Immutable after construction."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: dict[str, str | None] | None = None,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self._backend = backend
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        if bos_token_id is None and "bos_token" in self.special_tokens:
            bos_token_id = backend.token_to_id(self.special_tokens["bos_token"])
        if not eos_token_ids and "eos_token" in self.special_tokens:
            eos_id = backend.token_to_id(self.special_tokens["eos_token"])
            eos_token_ids = () if eos_id is None else (eos_id,)
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(int(i) for i in eos_token_ids)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    # ---- encode / decode ----------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of a plain prompt, with the special tokens HF's tokenizer adds by default."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=True).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._backend.decode(
            [int(i) for i in token_ids], skip_special_tokens=skip_special_tokens
        )
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def convert_ids_to_tokens(
        self, token_ids: int | Sequence[int]
    ) -> str | None | list[str | None]:
        if isinstance(token_ids, int):
            return self._backend.id_to_token(token_ids)
        return [self._backend.id_to_token(int(i)) for i in token_ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # ---- chat ---------------------------------------------------------------------------

    def render_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The chat template applied to `messages`, as text."""
        _validate_messages(messages)
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        template = _compile_template(self.chat_template)
        return template.render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self._backend.encode(text, add_special_tokens=False).ids

    # ---- persistence --------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (loadable by HF as well)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_FILE).write_text(_compact_json(self._backend), encoding="utf-8")
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "chat_template": self.chat_template,
            **self.special_tokens,
        }
        (directory / TOKENIZER_CONFIG_FILE).write_text(
            json.dumps(config, indent=2, ensure_ascii=False)
        )

    @classmethod
    def from_directory(
        cls,
        directory: str | Path,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> Tokenizer:
        """Load HF-style tokenizer files (as written by `save` or `save_pretrained`)."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"{directory} has no {TOKENIZER_FILE}")
        backend = BackendTokenizer.from_file(str(path))
        config_path = directory / TOKENIZER_CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        chat_template = _select_chat_template(config.get("chat_template"))
        if (directory / CHAT_TEMPLATE_FILE).is_file():
            chat_template = (directory / CHAT_TEMPLATE_FILE).read_text()
        special = {name: _token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        return cls(
            backend,
            chat_template=chat_template,
            special_tokens=special,
            bos_token_id=bos_token_id,
            eos_token_ids=eos_token_ids,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    @classmethod
    def from_gguf(
        cls, gguf: GGUFFile, bos_token_id: int | None = None, eos_token_ids: Sequence[int] = ()
    ) -> Tokenizer:
        md = gguf.metadata
        tokens: list[str] = md["tokenizer.ggml.tokens"]
        special = {}
        for name, key in zip(
            SPECIAL_TOKEN_NAMES, ("bos", "eos", "unknown", "padding"), strict=True
        ):
            token_id = md.get(f"tokenizer.ggml.{key}_token_id")
            special[name] = (
                tokens[token_id] if token_id is not None and token_id < len(tokens) else None
            )
        if md.get("tokenizer.ggml.model") == "gpt2":
            backend = _byte_level_bpe_from_gguf(md, special)
        else:
            backend = _backend_via_transformers(gguf.path)
        return cls(
            backend,
            chat_template=md.get("tokenizer.chat_template"),
            special_tokens=special,
            bos_token_id=bos_token_id,
            eos_token_ids=eos_token_ids,
        )


def _compact_json(backend: BackendTokenizer) -> str:
    """The backend's tokenizer.json in the form `tokenizers` parses fastest: no indentation
    and, where no merged piece holds a space, merges written "a b" rather than ["a", "b"] (the
    older form, which every version still reads): 25 % less parse, which is most of a cached
    model load. Only the merges are decoded and re-encoded (the whole file through `json`
    took ten times as long as the saving)."""
    text = backend.to_str()
    start = text.rfind(_MERGES_KEY)  # the model's, written last: a token may be "merges" too
    if start < 0:
        return text
    start += len(_MERGES_KEY)
    merges, end = json.JSONDecoder().raw_decode(text, start)
    if not isinstance(merges, list) or not all(
        isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges
    ):
        return text
    legacy = json.dumps([f"{first} {second}" for first, second in merges], ensure_ascii=False)
    return text[:start] + legacy + text[end:]


_MERGES_KEY = '"merges":'


# ---- building from GGUF metadata --------------------------------------------------------


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (as in transformers/openai)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _byte_level_bpe_from_gguf(
    md: dict[str, Any], special: dict[str, str | None]
) -> BackendTokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    # A token written in raw UTF-8 rather than the byte alphabet gets respelled, as HF does.
    # Most vocabularies need none, and one check over all of them costs a fifth of one per token.
    if set("".join(tokens)) <= alphabet:
        vocab = dict(zip(tokens, range(len(tokens)), strict=True))
    else:
        vocab = {
            (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
            for i, t in enumerate(tokens)
        }
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    backend = BackendTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = _PRE_TOKENIZER_SPLITS.get(md.get("tokenizer.ggml.pre", ""))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()

    token_types = md.get("tokenizer.ggml.token_type")
    token_types = list(token_types) if token_types is not None else [0] * len(tokens)
    named = {t for t in special.values() if t is not None and t in vocab}
    control = [
        t
        for t, kind in zip(tokens, token_types, strict=True)
        if kind == _CONTROL and set(t) <= alphabet
    ]
    backend.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t in dict.fromkeys(control + sorted(named))
        ]
    )
    user_defined = [
        t
        for t, kind in zip(tokens, token_types, strict=True)
        if kind == _USER_DEFINED and t in vocab
    ]
    if user_defined:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])
    backend.post_processor = _template_processing(
        special,
        vocab,
        bool(md.get("tokenizer.ggml.add_bos_token", False)),
        bool(md.get("tokenizer.ggml.add_eos_token", False)),
    )
    return backend


def _template_processing(
    special: dict[str, str | None], vocab: dict[str, int], add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing:
    """The post-processor transformers installs for `add_bos_token` / `add_eos_token`."""
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos = add_bos and bos is not None
    add_eos = add_eos and eos is not None
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special_tokens = ([(bos, vocab[bos])] if add_bos else []) + (
        [(eos, vocab[eos])] if add_eos else []
    )
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_tokens)


def _backend_via_transformers(gguf_path: Path) -> BackendTokenizer:
    """Non-BPE GGUF vocabularies (sentencepiece, unigram): let transformers convert them (slow)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return BackendTokenizer.from_str(hf.backend_tokenizer.to_str())


# ---- chat templates ---------------------------------------------------------------------


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            raise ValueError(f"messages[{index}] is missing {', '.join(repr(k) for k in missing)}")
        for key, value in message.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(
                    f"messages[{index}][{key!r}] must be a str, got {type(value).__name__}"
                )


@lru_cache(maxsize=8)
def _compile_template(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask marker): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(
                lineno
            )

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' override: jinja's own tojson escapes HTML characters
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _select_chat_template(value: Any) -> str | None:
    """`chat_template` in tokenizer_config.json is a str or a list of {name, template}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        return named.get("default")
    raise ValueError(f"unsupported chat_template value of type {type(value).__name__}")


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        return value.get("content")
    return value


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (only used when the tokenizer config asks for it)."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text
