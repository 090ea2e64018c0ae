"""Tokenizers: the tiny character tokenizers and the wrapper over a local Hugging Face tokenizer directory
(built here with the `tokenizers` library; nothing is downloaded)."""

import json

import pytest

from gdsd_jax.data.tokenizer import (
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    ascii_tokenizer,
    load_tokenizer,
)
from gdsd_jax.models.config import tiny_dream, tiny_llada
from gdsd_jax.tasks.countdown import countdown_tokenizer
from gdsd_jax.tasks.sudoku import sudoku_tokenizer


def test_sudoku_tokenizer_ids_and_roundtrip():
    tok = sudoku_tokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.encode("0123|?$") == [0, 1, 2, 3, 5, 6, 7]
    assert tok.decode([4, 3, 5, 6, 7]) == "43|?$"
    assert tok.decode([4, 3, 5, 6, 7], skip_special_tokens=True) == "43"
    with pytest.raises(ValueError, match="character '9' at position 1"):
        tok.encode("19")
    assert tok.apply_chat_template([{"role": "user", "content": "1200"}]) == "1200|"
    assert tok.apply_chat_template([{"role": "user", "content": "1200"}], add_generation_prompt=False) == "1200"


def test_countdown_tokenizer_ids():
    tok = countdown_tokenizer()
    text = "(12+3)*4-5/6,7|?$"
    expected = [14, 1, 2, 10, 3, 15, 12, 4, 11, 5, 13, 6, 16, 7, 17, 18, 19]
    assert tok.encode(text) == expected and tok.decode(expected) == text
    assert tok.vocab_size == 20


def test_ascii_tokenizer_matches_tiny_presets():
    tok = ascii_tokenizer()
    for cfg in (tiny_llada(), tiny_dream()):
        assert (tok.vocab_size, tok.mask_id, tok.eos_id, tok.pad_id) == (
            cfg.vocab_size, cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id)
    text = "Hi <|mdm_mask|> there<|eot_id|>"
    ids = tok.encode(text)
    assert ids == [ord(c) for c in "Hi "] + [250] + [ord(c) for c in " there"] + [251]
    assert tok.decode(ids) == text
    assert tok.encode("é") == [ord("?")]  # non-ASCII -> '?'
    chat = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert chat == "<|system|>\nS\n<|user|>\nU\n<|assistant|>\n"


def test_char_tokenizer_validation():
    with pytest.raises(ValueError, match="mask"):
        CharTokenizer({0: "a", 1: "b"}, {"eos": 1})
    with pytest.raises(ValueError, match="chat_format"):
        CharTokenizer({0: "a", 1: "b"}, {"eos": 1, "mask": 0}, chat_format="fancy")


# ---- Hugging Face tokenizer directory, built locally ----

VOCAB = ["[UNK]", "<|endoftext|>", "<|mdm_mask|>", "<|start|>", "<|end|>", "user", "assistant", "system",
         "what", "is", "2", "+", "?", "hello", "world", "\n"]
TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")


def _build(directory, *, mask_token="<|mdm_mask|>", chat_template=TEMPLATE, config=None):
    from tokenizers import AddedToken, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    # split on spaces (dropped) and newlines (kept as tokens)
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                 pre_tokenizers.Split(" ", behavior="removed")])
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VOCAB[1:5]])
    kw = {"mask_token": mask_token} if mask_token else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]", **kw)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(directory))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_hf_wrapper_interface(tmp_path):
    tok = load_tokenizer(_build(tmp_path / "tok"))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.mask_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, 1, len(VOCAB))
    text = "<|start|>user\nwhat is 2 + 2 ?<|end|><|start|>assistant\n"
    # ids by hand from VOCAB: specials are single tokens, "\n" is its own token, no BOS is added
    assert tok.encode(text) == [3, 5, 15, 8, 9, 10, 11, 10, 12, 4, 3, 6, 15]
    assert tok.encode("hello world") == [13, 14]
    assert tok.decode([13, 1], skip_special_tokens=True).strip() == "hello"


def test_hf_chat_template(tmp_path):
    pytest.importorskip("jinja2", reason="transformers renders chat templates with jinja2")
    tok = load_tokenizer(_build(tmp_path / "tok"))
    text = tok.apply_chat_template([{"role": "user", "content": "what is 2 + 2 ?"}])
    assert text == "<|start|>user\nwhat is 2 + 2 ?<|end|><|start|>assistant\n"
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=False) == (
        "<|start|>user\nhello<|end|>")


def test_hf_mask_id_resolution(tmp_path):
    # from config.json when the tokenizer has no mask token
    tok = load_tokenizer(_build(tmp_path / "a", mask_token=None, config={"mask_token_id": 4}))
    assert tok.mask_id == 4
    # from the known LLaDA spelling when neither says
    tok = load_tokenizer(_build(tmp_path / "b", mask_token=None))
    assert tok.mask_id == 2
    # explicit override wins
    assert load_tokenizer(tmp_path / "b", mask_token_id=3).mask_id == 3


def test_hf_tolerates_invalid_special_tokens_map(tmp_path):
    d = _build(tmp_path / "c")
    (d / "special_tokens_map.json").write_text('{"eos_token": "<|endoftext|>" "mask_token": "<|mdm_mask|>"}')
    tok = load_tokenizer(d)
    assert tok.eos_id == 1 and tok.mask_id == 2


def test_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    tok = load_tokenizer(_build(tmp_path / "d", chat_template=None))
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])
    d = _build(tmp_path / "e", mask_token=None)
    with pytest.raises(ValueError, match="pad id equals mask id"):
        load_tokenizer(d, mask_token_id=1)
