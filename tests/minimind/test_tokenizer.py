"""The shipped tokenizer (minimind/minimind_fast/assets) and the Tokenizer wrapper.

Round trips on varied text, the special ids, ChatML rendering checked against a string written out by hand, the
saved folder read back by transformers with the same ids and chat template, and a tokenizer.json in MiniMind's own
layout loading unchanged. The shipped files must also be exactly what tools/train_tokenizer.py makes from data/sample.
Where the chat template of a loaded folder comes from is checked here; what the template renders, against MiniMind2's
own, in test_template_fidelity.py.
"""

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minimind_fast.tokenizer import ASSETS, CHAT_TEMPLATE, Tokenizer, TokenizerError
from tools import train_tokenizer

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
TRAIN_FILES = ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "rlaif.jsonl", "r1_mix.jsonl", "lora_identity.jsonl")

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "23 + 45 = 68\n99 - 17 = 82",
    "机器学习是人工智能的一个分支。你好，世界！",
    "emoji: 🙂🚀👩‍👩‍👧 and a flag 🇫🇷",
    "tabs\tand   runs of    spaces\n\n\n  leading and trailing   ",
    "   ",
    "",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "text with a special token inside: a<|im_end|>b and a fake one <|im_middle|>",
    "control \x00\x01 bytes, accents: café naïve Ångström, RTL: שלום مرحبا",
    "<think>\nreasoning\n</think>\n<answer>\n42\n</answer>",
]
CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "Thanks!\nBye."},
]
CHATML = (
    "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
    "<|im_start|>assistant\n2 + 2 = 4.<|im_end|>\n"
    "<|im_start|>user\nThanks!\nBye.<|im_end|>\n"
)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_special_tokens_and_vocab(tokenizer):
    assert tokenizer.vocab_size == len(tokenizer) == 6400
    assert [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    # A special token written in text is one id; the same characters are not split into pieces.
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.encode("a<|im_end|>b") == tokenizer.encode("a") + [2] + tokenizer.encode("b")
    # Ids 0-2 are the only special tokens: nothing else is dropped by skip_special_tokens.
    assert tokenizer.decode([1, *tokenizer.encode("hi"), 2, 0], skip_special_tokens=True) == "hi"
    added = tokenizer.hf.get_added_tokens_decoder()
    assert sorted(added) == [0, 1, 2] and all(t.special for t in added.values())


def test_model_layout(tokenizer):
    spec = json.loads(tokenizer.hf.to_str())
    assert spec["model"]["type"] == "BPE"
    assert spec["normalizer"] is None
    assert spec["pre_tokenizer"]["type"] == "ByteLevel" and spec["pre_tokenizer"]["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel"
    # Every single byte is a token, so no text is ever unknown.
    vocab = tokenizer.hf.get_vocab()
    assert all(ch in vocab for ch in pre_tokenizers.ByteLevel.alphabet())


def test_chat_template(tokenizer):
    assert tokenizer.apply_chat_template(CONVERSATION) == CHATML
    with_prompt = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert with_prompt == CHATML + "<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    assert ids == tokenizer.encode(with_prompt)
    assert ids[0] == 1 and ids.count(1) == 5 and ids.count(2) == 4
    assert tokenizer.decode(ids) == with_prompt


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "bot", "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"content": "no role"}],
        [{"role": "user", "content": 3}],
        [{"role": "user", "content": ["a", "list"]}],
        [{"role": "system", "content": None}, {"role": "user", "content": "hi"}],
        [{"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}],
        [{"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}],
        [{"role": "assistant", "content": "", "tool_calls": {"name": "f", "arguments": {}}}],
        "not a list of messages",
    ],
)
def test_bad_messages_raise(tokenizer, messages):
    """The template would drop an unknown role or render other content as empty text; a training record like that is
    refused instead."""
    with pytest.raises(TokenizerError):
        tokenizer.apply_chat_template(messages)


def test_bad_tools_raise(tokenizer):
    with pytest.raises(TokenizerError, match=r"tools\[1\] must be a JSON-schema object"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[{"name": "f"}, len])
    with pytest.raises(TokenizerError, match=r"tools\[0\] is not JSON-serialisable"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[{"f": {1, 2}}])


def test_template_source_of_a_loaded_folder(tmp_path):
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or transformers' named list), else
    ours; also when the tokenizer.json file itself is named. A template that cannot render names the tokenizer."""
    shutil.copy(ASSETS / "tokenizer.json", tmp_path / "tokenizer.json")
    config = tmp_path / "tokenizer_config.json"
    assert Tokenizer.load(tmp_path).chat_template == CHAT_TEMPLATE
    x = [{"role": "user", "content": "x"}]
    config.write_text(json.dumps({"chat_template": "{{ messages[0].content }}|cfg"}))
    assert Tokenizer.load(tmp_path / "tokenizer.json").apply_chat_template(x) == "x|cfg"
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}|file")
    assert Tokenizer.load(tmp_path).apply_chat_template(x) == "x|file"
    (tmp_path / "chat_template.jinja").unlink()
    named = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "{{ tools | length }} tools"}]
    config.write_text(json.dumps({"chat_template": named}))
    tok = Tokenizer.load(tmp_path)
    assert tok.apply_chat_template([]) == "plain" and tok.apply_chat_template([], tools=[{}, {}]) == "2 tools"
    assert json.loads((tok.save(tmp_path / "saved") / "tokenizer_config.json").read_text())["chat_template"] == named
    config.write_text(json.dumps({"chat_template": "{{ raise_exception('no such thing') }}"}))
    with pytest.raises(TokenizerError, match="chat template: no such thing"):
        Tokenizer.load(tmp_path).apply_chat_template([])
    config.write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: its chat template failed \(TemplateSyntaxError"):
        Tokenizer.load(tmp_path).apply_chat_template([])
    config.write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not readable JSON"):
        Tokenizer.load(tmp_path)


def test_save_load_round_trip(tokenizer, tmp_path):
    folder = tokenizer.save(tmp_path / "tok")
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    again = Tokenizer.load(folder)
    assert again.hf.to_str() == tokenizer.hf.to_str()
    for text in TEXTS:
        assert again.encode(text) == tokenizer.encode(text)
    assert Tokenizer.load(folder / "tokenizer.json").vocab_size == 6400
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError):
        Tokenizer.load(tmp_path)


def test_transformers_loads_saved_folder(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    folder = tokenizer.save(tmp_path / "tok")
    for loader in (transformers.PreTrainedTokenizerFast, transformers.AutoTokenizer):
        hf = loader.from_pretrained(str(folder))
        assert len(hf) == 6400
        assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
        for text in TEXTS:
            assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text)
            assert hf.decode(tokenizer.encode(text)) == text
        for gen in (False, True):
            theirs = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen)
            assert theirs == tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=gen)


def _minimind_style_tokenizer() -> HFTokenizer:
    """A small tokenizer built the way MiniMind's own train_tokenizer script builds its tokenizer.json."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator([t for t in TEXTS if t] * 20, trainer=trainer)
    hf.decoder = decoders.ByteLevel()
    return hf


def test_minimind_layout_loads_unchanged(tmp_path):
    hf = _minimind_style_tokenizer()
    hf.save(str(tmp_path / "tokenizer.json"))
    # MiniMind ships its own tokenizer_config.json (with its own template); loading must not depend on it.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    before = (tmp_path / "tokenizer.json").read_bytes()
    tok = Tokenizer.load(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == before
    assert tok.vocab_size == hf.get_vocab_size()
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text


def test_wrong_special_ids_rejected(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_start|>", "<|endoftext|>", "<|im_end|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(["some text"], trainer=trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError):
        Tokenizer.load(tmp_path)


def test_shipped_tokenizer_is_reproducible(tokenizer, tmp_path):
    """tools/train_tokenizer.py on the shipped sample data gives exactly the shipped tokenizer.json."""
    trained = train_tokenizer.main(["--data", *(str(SAMPLE / f) for f in TRAIN_FILES), "--out", str(tmp_path)])
    assert trained.vocab_size == 6400
    shipped = Path(tokenizer.source).read_bytes()
    assert (tmp_path / "tokenizer.json").read_bytes() == shipped
    assert (tmp_path / "tokenizer_config.json").read_bytes() == (
        Path(tokenizer.source).parent / "tokenizer_config.json"
    ).read_bytes()


def test_train_tokenizer_reads_every_format(tmp_path):
    rows = [
        {"text": "plain text"},
        {"conversations": [{"role": "user", "content": "question"}, {"role": "assistant", "content": "reply"}]},
        {"chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert list(train_tokenizer.iter_texts([path])) == ["plain text", "question", "reply", "good", "bad"]
