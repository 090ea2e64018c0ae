"""Prompt building: official chat prompt (or compact ids) -> token ids -> left-padded fixed-length arrays.

For the official format, a prompt's text is ``tokenizer.apply_chat_template(task.prompt_messages(ex, split))
+ task.prompt_prefill(split)`` (the chat template adds the generation prompt, as trl's
``maybe_apply_chat_template`` does for a user turn), encoded without extra special tokens. For the compact
format (``compact=True``) the ids are ``task.compact_prompt(ex)``.

Prompts are left-padded with ``tokenizer.pad_id`` to ``max_prompt_length`` (the completion follows the
prompt on the right, so every row's last prompt token sits at the same position). A longer prompt is,
by ``overflow``:

* ``"truncate"``: cut from the LEFT (its end, where the question and the generation prompt are, is kept);
  counted in :attr:`PromptBatch.num_truncated` and logged as a warning;
* ``"reject"``: dropped from the dataset before batching (:func:`filter_examples`, counted and logged);
* ``"error"``: a ``ValueError`` naming the example.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from gdsd_jax.tasks.base import Task

log = logging.getLogger(__name__)

OVERFLOW_MODES = ("truncate", "reject", "error")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How prompts are built.

    Attributes:
      max_prompt_length: ``Lp``, the fixed prompt length.
      overflow: ``"truncate"`` | ``"reject"`` | ``"error"`` (module docstring).
      split: ``"train"`` or ``"test"``: which official prompt (training and evaluation prompts differ).
      compact: use the task's compact token format instead of the chat template.
    """

    max_prompt_length: int
    overflow: str = "truncate"
    split: str = "train"
    compact: bool = False

    def __post_init__(self):
        if self.max_prompt_length <= 0:
            raise ValueError(f"PromptConfig.max_prompt_length must be positive, got {self.max_prompt_length}")
        if self.overflow not in OVERFLOW_MODES:
            raise ValueError(f"PromptConfig.overflow must be one of {OVERFLOW_MODES}, got {self.overflow!r}")
        if self.split not in ("train", "test"):
            raise ValueError(f"PromptConfig.split must be 'train' or 'test', got {self.split!r}")


@dataclasses.dataclass
class PromptBatch:
    """``prompt_ids`` int32 ``[N, Lp]`` (left-padded), ``prompt_mask`` int32 ``[N, Lp]`` (1 real, 0 pad), the
    batch's examples, and how many prompts were truncated."""

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    examples: list[dict]
    num_truncated: int = 0

    def as_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "prompt_mask": self.prompt_mask, "examples": self.examples,
                "num_truncated": self.num_truncated}


def prompt_text(task: Task, example: dict, tokenizer, *, split: str = "train") -> str:
    """The official prompt text (chat template + generation prompt + prefill)."""
    messages = task.prompt_messages(example, split=split)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True) + task.prompt_prefill(split=split)


def prompt_token_ids(task: Task, example: dict, tokenizer, *, split: str = "train", compact: bool = False) -> list[int]:
    """Unpadded prompt ids of one example."""
    if compact:
        if not task.supports_compact:
            raise ValueError(f"task {task.name!r} has no compact token format (only sudoku and countdown do)")
        return list(task.compact_prompt(example))
    return list(tokenizer.encode(prompt_text(task, example, tokenizer, split=split)))


def left_pad(sequences: Sequence[Sequence[int]], length: int, pad_id: int, *, overflow: str = "truncate",
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """Left-pad (and left-truncate) to ``length``: returns ``(ids [N, L] int32, mask [N, L] int32, num_truncated)``.

    With ``overflow`` other than ``"truncate"`` an over-long sequence raises ``ValueError``.
    """
    n = len(sequences)
    ids = np.full((n, length), pad_id, dtype=np.int32)
    mask = np.zeros((n, length), dtype=np.int32)
    truncated = 0
    for i, seq in enumerate(sequences):
        seq = list(seq)
        if len(seq) > length:
            if overflow != "truncate":
                raise ValueError(f"prompt {i} has {len(seq)} tokens, more than max_prompt_length={length} "
                                 f"(overflow={overflow!r}; use 'truncate' or a larger max_prompt_length)")
            seq = seq[-length:]
            truncated += 1
        if seq:
            ids[i, length - len(seq):] = seq
            mask[i, length - len(seq):] = 1
    return ids, mask, truncated


def build_prompts(task: Task, examples: Sequence[dict], tokenizer, config: PromptConfig) -> PromptBatch:
    """Tokenise and left-pad the prompts of ``examples`` (see module docstring)."""
    seqs = [prompt_token_ids(task, ex, tokenizer, split=config.split, compact=config.compact) for ex in examples]
    ids, mask, truncated = left_pad(seqs, config.max_prompt_length, tokenizer.pad_id, overflow=config.overflow)
    if truncated:
        log.warning("%d of %d prompts longer than %d tokens were truncated from the left", truncated, len(seqs),
                    config.max_prompt_length)
    return PromptBatch(ids, mask, list(examples), truncated)


def filter_examples(task: Task, examples: Sequence[dict], tokenizer, config: PromptConfig) -> tuple[list[dict], int]:
    """For ``overflow="reject"``: the examples whose prompt fits, and how many were rejected."""
    kept = [ex for ex in examples
            if len(prompt_token_ids(task, ex, tokenizer, split=config.split, compact=config.compact))
            <= config.max_prompt_length]
    rejected = len(examples) - len(kept)
    if rejected:
        log.warning("rejected %d of %d examples whose prompt is longer than %d tokens", rejected, len(examples),
                    config.max_prompt_length)
    if not kept:
        raise ValueError(f"every one of the {len(examples)} prompts is longer than max_prompt_length="
                         f"{config.max_prompt_length}: nothing left to train on")
    return kept, rejected
