"""Prompt building: left padding, masks, official chat prompts with their prefill, truncation / rejection."""

import logging

import numpy as np
import pytest

from gdsd_jax.data.tokenizer import ascii_tokenizer
from gdsd_jax.tasks import get_task
from gdsd_jax.tasks.prompts import PromptConfig, build_prompts, filter_examples, left_pad, prompt_text


def test_left_pad_by_hand():
    ids, mask, truncated = left_pad([[5, 6], [1, 2, 3, 4, 5, 6], []], 4, pad_id=0)
    np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [3, 4, 5, 6], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert truncated == 1 and ids.dtype == np.int32 and mask.dtype == np.int32
    with pytest.raises(ValueError, match="prompt 1 has 6 tokens"):
        left_pad([[1], [1, 2, 3, 4, 5, 6]], 4, pad_id=0, overflow="error")


def test_compact_prompts():
    task = get_task("sudoku")
    tok = task.compact_tokenizer()
    batch = build_prompts(task, task.examples("test")[:8], tok, PromptConfig(17, compact=True, split="test"))
    assert batch.prompt_ids.shape == (8, 17) and batch.prompt_ids.dtype == np.int32
    assert batch.prompt_mask.min() == 1 and batch.num_truncated == 0
    for row, ex in zip(batch.prompt_ids, batch.examples):
        assert row.tolist() == [int(c) for c in ex["puzzle"]] + [5]


def test_official_prompts_with_a_tokenizer(caplog):
    task = get_task("countdown")
    tok = ascii_tokenizer()
    examples = task.examples("test")[:6]
    texts = [prompt_text(task, ex, tok, split="test") for ex in examples]
    assert all(t.endswith("<|assistant|>\n<reasoning>") for t in texts)          # eval prefill
    assert prompt_text(task, examples[0], tok, split="train").endswith("<|assistant|>\n")
    lengths = [len(tok.encode(t)) for t in texts]
    lp = max(lengths) + 3
    out = build_prompts(task, examples, tok, PromptConfig(lp, split="test"))
    for row, mask, n, t in zip(out.prompt_ids, out.prompt_mask, lengths, texts):
        assert mask.tolist() == [0] * (lp - n) + [1] * n
        assert row[: lp - n].tolist() == [tok.pad_id] * (lp - n)
        assert tok.decode(row[lp - n:]) == t
    # truncation from the left keeps the end of the prompt, counted and logged
    short = min(lengths) - 10
    with caplog.at_level(logging.WARNING):
        out = build_prompts(task, examples, tok, PromptConfig(short, split="test"))
    assert out.num_truncated == 6 and "truncated" in caplog.text
    assert tok.decode(out.prompt_ids[0]) == texts[0][-short:]
    with pytest.raises(ValueError, match="max_prompt_length"):
        build_prompts(task, examples, tok, PromptConfig(short, overflow="error", split="test"))


def test_reject_mode_filters_before_batching(caplog):
    task = get_task("countdown")
    tok = ascii_tokenizer()
    examples = task.examples("test")[:20]
    lengths = [len(tok.encode(prompt_text(task, ex, tok))) for ex in examples]
    limit = sorted(lengths)[10]
    cfg = PromptConfig(limit, overflow="reject")
    kept, rejected = filter_examples(task, examples, tok, cfg)
    assert len(kept) == sum(n <= limit for n in lengths) and rejected == 20 - len(kept)
    assert kept == [ex for ex, n in zip(examples, lengths) if n <= limit]          # order kept
    with pytest.raises(ValueError, match="nothing left"):
        filter_examples(task, examples, tok, PromptConfig(3, overflow="reject"))


def test_prompt_config_validation():
    with pytest.raises(ValueError, match="overflow"):
        PromptConfig(10, overflow="drop")
    with pytest.raises(ValueError, match="split"):
        PromptConfig(10, split="valid")
    with pytest.raises(ValueError, match="compact"):
        build_prompts(get_task("gsm8k"), [{"question": "q"}], ascii_tokenizer(), PromptConfig(10, compact=True))
