"""``gdsd-jax sample`` end to end on a tiny checkpoint written to a temporary directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sampling_reference import jax_logits_fn, llada_reference, random_params

from gdsd_jax.cli import main
from gdsd_jax.models.config import tiny_llada


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from gdsd_jax.checkpoint.params_io import save_params

    cfg = tiny_llada()
    params = random_params(cfg, seed=12, std=0.3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_params(path, params, cfg)
    return path, cfg, params


def _tiny_hf_tokenizer(directory, cfg):
    """A word-level Hugging Face tokenizer whose specials match the tiny config (mask 250, eos = pad 251)."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "what", "is", "two", "plus", "three", "?", "user", "assistant", ":"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(words), 240)})
    vocab.update({"<|mdm_mask|>": cfg.mask_token_id, "<|eos|>": cfg.eos_token_id})
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|eos|>",
                                   pad_token="<|eos|>", mask_token="<|mdm_mask|>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant :{% endif %}")
    fast.save_pretrained(str(directory))
    return directory


def test_sample_prompt_ids_matches_reference(checkpoint, tmp_path, capsys):
    path, cfg, params = checkpoint
    out = tmp_path / "out.jsonl"
    rc = main(["sample", "--checkpoint", str(path), "--prompt-ids", "5,17,9", "--prompt-ids", "4, 4",
               "--gen-length", "8", "--steps", "4", "--block-length", "4", "--output", str(out)])
    assert rc == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_ids"] for r in recs] == [[5, 17, 9], [4, 4]]
    # Independent check: the per-step NumPy reference on the same left-padded batch (greedy).
    ids = np.array([[5, 17, 9], [cfg.pad_token_id, 4, 4]], np.int32)
    mask = np.array([[1, 1, 1], [0, 1, 1]], np.int32)
    ref = llada_reference(jax_logits_fn(params, cfg), ids, mask, mask_id=cfg.mask_token_id,
                          eos_id=cfg.eos_token_id, gen_length=8, steps=4, block_length=4)[:, 3:]
    for r, row in zip(recs, ref):
        hits = np.nonzero(row == cfg.eos_token_id)[0]
        n = hits[0] + 1 if len(hits) else len(row)
        assert r["completion_ids"] == row[:n].tolist()
    printed = capsys.readouterr().out
    assert "=== prompt 0 ===" in printed and "=== prompt 1 ===" in printed


@pytest.mark.parametrize("chat", [False, True])
def test_sample_text_prompts_with_tokenizer(checkpoint, tmp_path, chat):
    path, cfg, _ = checkpoint
    if chat:
        pytest.importorskip("jinja2", reason="Hugging Face chat templates need jinja2")
    tok_dir = _tiny_hf_tokenizer(tmp_path / "tok", cfg)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("what is two plus three ?\n\nwhat is two ?\n")
    out = tmp_path / "out.jsonl"
    rc = main(["sample", "--checkpoint", str(path), "--tokenizer", str(tok_dir), "--prompt-file", str(prompts),
               "--gen-length", "8", "--steps", "8", "--temperature", "1.0", "--seed", "3",
               "--batch-size", "1", "--output", str(out)] + (["--chat"] if chat else []))
    assert rc == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2
    from gdsd_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir)
    text = "what is two plus three ?"
    expected = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]) if chat else text)
    assert recs[0]["prompt_ids"] == expected
    assert len(expected) == (10 if chat else 6)
    assert recs[0]["prompt"] == text
    for r in recs:
        assert isinstance(r["completion"], str) and 1 <= len(r["completion_ids"]) <= 8


@pytest.mark.parametrize("argv,needle", [
    (["--gen-length", "10", "--steps", "4", "--block-length", "4", "--sampler", "llada"],
     "gen_length=10 is not divisible by block_length=4"),
    (["--gen-length", "32", "--steps", "2", "--block-length", "8", "--sampler", "llada"],
     "steps=2 is less than the number of blocks 4"),
    (["--gen-length", "8", "--steps", "0"], "SamplingConfig.steps=0"),
    (["--gen-length", "8", "--steps", "4", "--top-p", "2"], "SamplingConfig.top_p=2.0"),
])
def test_bad_settings_fail_before_loading(tmp_path, capsys, argv, needle):
    # The checkpoint does not exist: the settings error must come first.
    rc = main(["sample", "--checkpoint", str(tmp_path / "missing"), "--prompt-ids", "1,2"] + argv)
    assert rc == 1
    assert needle in capsys.readouterr().err


def test_bad_inputs_after_loading(checkpoint, capsys, tmp_path):
    path, cfg, _ = checkpoint
    rc = main(["sample", "--checkpoint", str(tmp_path / "nowhere"), "--prompt-ids", "1,2", "--gen-length", "8",
               "--steps", "4"])
    assert rc == 1 and "nowhere" in capsys.readouterr().err
    rc = main(["sample", "--checkpoint", str(path), "--prompt", "hello", "--gen-length", "8", "--steps", "4"])
    assert rc == 1 and "need a tokenizer" in capsys.readouterr().err
    rc = main(["sample", "--checkpoint", str(path), "--prompt-ids", "1,2", "--gen-length", str(cfg.max_seq_len),
               "--steps", "4"])
    assert rc == 1 and "exceeds the model's max_seq_len" in capsys.readouterr().err
    rc = main(["sample", "--checkpoint", str(path), "--prompt-ids", "1,x", "--gen-length", "8", "--steps", "4"])
    assert rc == 1 and "comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):     # unknown algorithm: rejected by the argument parser
        main(["sample", "--checkpoint", str(path), "--prompt-ids", "1", "--gen-length", "8", "--steps", "4",
              "--alg", "greedy"])


def test_read_prompts_and_left_pad(tmp_path):
    import argparse

    from gdsd_jax.commands.sample import left_pad, read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hi there"}\n\n{"prompt_ids": [3, 4, 5]}\n')
    ns = argparse.Namespace(prompt=None, prompt_ids=None, prompt_file=str(f))
    assert read_prompts(ns) == [{"text": "hi there"}, {"ids": [3, 4, 5]}]
    f.write_text('{"text": 1}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: expected an object with 'prompt'"):
        read_prompts(ns)
    ids, mask = left_pad([[1, 2, 3], [7]], pad_id=9)
    np.testing.assert_array_equal(ids, [[1, 2, 3], [9, 9, 7]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
