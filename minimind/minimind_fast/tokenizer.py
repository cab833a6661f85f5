"""MiniMind's tokenizer: byte-level BPE (HF `tokenizers`), vocab 6400, specials at ids 0-2, ChatML chat template.

    tok = Tokenizer.load()                    # the tokenizer shipped with the project (minimind/minimind_fast/assets/)
    tok = Tokenizer.load("path/to/dir")      # any folder with tokenizer.json (MiniMind's own works unchanged)
    ids = tok.encode("hello")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)

Saved folders hold a standard tokenizer.json plus tokenizer_config.json with the chat template as Jinja, so
`transformers.PreTrainedTokenizerFast` / `AutoTokenizer` load them too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2
ROLES = ("system", "user", "assistant")
ASSETS = Path(__file__).resolve().parent / "assets"

# ChatML, as Jinja for transformers; render_chatml below is the same thing in Python (the tests check they agree).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TokenizerError(ValueError):
    """A tokenizer folder or a chat message that cannot be used."""


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then `<|im_start|>assistant\\n` if asked."""
    parts = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise TokenizerError(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise TokenizerError(f"message {i}: content must be a string, got {type(content).__name__}")
        parts.append(f"{BOS_TOKEN}{role}\n{content}{EOS_TOKEN}\n")
    if add_generation_prompt:
        parts.append(f"{BOS_TOKEN}assistant\n")
    return "".join(parts)


class Tokenizer:
    def __init__(self, hf: _HFTokenizer, source: str = "<memory>"):
        self.hf = hf
        self.source = source
        ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != [0, 1, 2]:
            raise TokenizerError(f"{source}: special tokens {SPECIAL_TOKENS} must have ids 0, 1, 2; found {ids}")
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    @classmethod
    def load(cls, path: str | Path | None = None) -> Tokenizer:
        """Load from a folder holding tokenizer.json, or from the tokenizer.json file itself (default: shipped)."""
        p = Path(path) if path is not None else ASSETS
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise TokenizerError(f"no tokenizer.json at {file}")
        try:
            hf = _HFTokenizer.from_file(str(file))
        except Exception as exc:
            raise TokenizerError(f"{file}: not a readable tokenizer.json ({exc})") from exc
        return cls(hf, str(file))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of text. No bos/eos is added; special tokens written in the text are recognised."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = False, tokenize: bool = False
    ) -> str | list[int]:
        text = render_chatml(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text

    def save(self, folder: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json (HF-loadable, with the chat template) into folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "unk_token": PAD_TOKEN,
            "model_max_length": 32768,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return folder
