"""Bridges a :class:`~gdsd_jax.tasks.base.Task` and the token arrays the trainer works on.

Two prompt formats:

* ``compact``: the task's own small token format (tiny models; e.g. Sudoku digits in, digits out). The
  reward is computed from the completion ids directly.
* ``chat``: the task's official chat prompt through a tokenizer's chat template, left-padded to
  ``prompt_length``; completions are decoded and scored by the task's reward functions.

Either way the trainer sees ``encode(examples) -> (prompt_ids [N, Lp], prompt_mask [N, Lp])`` and
``score(completion_ids [N, Lg], completion_mask [N, Lg], examples) -> Scores``, and evaluation
``eval_metrics(completion_ids, completion_mask, examples) -> (metrics, texts)``: per-completion metrics
(name -> [N]) that the task's ``aggregate_metrics`` turns into the set-level numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from gdsd_jax.tasks.base import Task, score_batch
from gdsd_jax.tasks.prompts import PromptConfig, build_prompts


@dataclasses.dataclass
class Scores:
    rewards: np.ndarray                      # [N] weighted sum of the reward functions
    per_fn: dict[str, np.ndarray]            # name -> [N]
    failures: int                            # completions a reward function could not parse / crashed on
    texts: list[str] | None = None           # decoded completions (chat format)


class CompactAdapter:
    """Compact token format: the task provides ``compact_prompt``, ``compact_reward`` and ``compact_solution``."""

    def __init__(self, task: Task, prompt_length: int, pad_id: int, eos_id: int):
        if not getattr(task, "supports_compact", False):
            raise ValueError(f"task {task.name!r} has no compact token format; use task.format=chat")
        self.task = task
        self.prompt_length = prompt_length
        self.pad_id = pad_id
        self.eos_id = eos_id

    def encode(self, examples: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(examples), self.prompt_length), self.pad_id, np.int32)
        mask = np.zeros((len(examples), self.prompt_length), np.int32)
        for i, ex in enumerate(examples):
            p = list(self.task.compact_prompt(ex))
            if len(p) > self.prompt_length:
                raise ValueError(f"compact prompt of length {len(p)} exceeds task.prompt_length={self.prompt_length}")
            ids[i, self.prompt_length - len(p):] = p
            mask[i, self.prompt_length - len(p):] = 1
        return ids, mask

    def targets(self, examples: Sequence[dict], gen_length: int) -> np.ndarray:
        """SFT targets [N, Lg]: the solution ids, EOS-padded to the generation length."""
        out = np.full((len(examples), gen_length), self.eos_id, np.int32)
        for i, ex in enumerate(examples):
            t = list(self.task.compact_solution(ex))[:gen_length]
            out[i, :len(t)] = t
        return out

    def score(self, completion_ids: np.ndarray, completion_mask: np.ndarray, examples: Sequence[dict]) -> Scores:
        rewards = np.zeros(len(examples), np.float32)
        failures = 0
        for i, ex in enumerate(examples):
            try:
                rewards[i] = float(self.task.compact_reward(list(map(int, completion_ids[i])), ex))
            except Exception:  # rewards are total: a failure scores 0 and is counted
                failures += 1
        return Scores(rewards, {self.task.name: rewards.copy()}, failures)

    def decode(self, completion_ids: np.ndarray) -> list[str]:
        return [" ".join(str(int(t)) for t in row) for row in completion_ids]

    def eval_metrics(self, completion_ids: np.ndarray, completion_mask: np.ndarray, examples: Sequence[dict],
                     ) -> tuple[dict[str, list[float]], list[str]]:
        """The project's protocol for the compact format: ``accuracy`` = solved, i.e. the compact reward
        reaches its maximum 1.0 (all blanks right / a correct expression)."""
        rewards = self.score(completion_ids, completion_mask, examples).rewards
        return {"accuracy": [float(r >= 1.0) for r in rewards]}, self.decode(completion_ids)


class ChatAdapter:
    """Official chat prompts through a tokenizer (prefill included, see :mod:`gdsd_jax.tasks.prompts`);
    rewards from the task's reward functions (:func:`gdsd_jax.tasks.base.score_batch`)."""

    def __init__(self, task: Task, tokenizer, prompt_length: int, *, split: str = "train", truncate: str = "left",
                 reward_weights: dict[str, float] | None = None):
        self.task = task
        self.tok = tokenizer
        self.prompt_length = prompt_length
        self.prompt_cfg = PromptConfig(max_prompt_length=prompt_length, split=split,
                                       overflow={"left": "truncate", "error": "error"}[truncate])
        self.reward_weights = dict(reward_weights or {})
        self.truncated = 0

    def encode(self, examples: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        batch = build_prompts(self.task, examples, self.tok, self.prompt_cfg)
        self.truncated += batch.num_truncated
        return batch.prompt_ids, batch.prompt_mask

    def decode(self, completion_ids: np.ndarray, completion_mask: np.ndarray | None = None) -> list[str]:
        special = {self.tok.eos_id, self.tok.pad_id, self.tok.mask_id}
        out = []
        for i, row in enumerate(completion_ids):
            keep = completion_mask[i] if completion_mask is not None else np.ones(len(row), bool)
            out.append(self.tok.decode([int(t) for t, m in zip(row, keep) if m and int(t) not in special]))
        return out

    def decode_raw(self, completion_ids: np.ndarray) -> list[str]:
        """Every generated token, special tokens and everything after the first EOS included."""
        return [self.tok.decode([int(t) for t in row]) for row in completion_ids]

    def eval_metrics(self, completion_ids: np.ndarray, completion_mask: np.ndarray, examples: Sequence[dict],
                     ) -> tuple[dict[str, list[float]], list[str]]:
        """The task's :meth:`~gdsd_jax.tasks.base.Task.eval_metrics` on the decoded completions (the raw
        generation when the task's protocol reads it), and those texts."""
        if self.task.eval_reads_raw_generation:
            texts = self.decode_raw(completion_ids)
        else:
            texts = self.decode(completion_ids, completion_mask)
        return self.task.eval_metrics(texts, list(examples)), texts

    def score(self, completion_ids: np.ndarray, completion_mask: np.ndarray, examples: Sequence[dict]) -> Scores:
        texts = self.decode(completion_ids, completion_mask)
        total, per_fn, failures = score_batch(self.task, texts, list(examples))
        if self.reward_weights:  # rl.reward_weights overrides the recipe's weights by function name
            unknown = sorted(set(self.reward_weights) - set(per_fn))
            if unknown:
                raise ValueError(f"rl.reward_weights names unknown reward function(s) {unknown}; "
                                 f"task {self.task.name!r} has {sorted(per_fn)}")
            weights = {wr.name: self.reward_weights.get(wr.name, wr.weight) for wr in self.task.rewards()}
            total = sum(weights[k] * v for k, v in per_fn.items()).astype(np.float32)
        return Scores(total, per_fn, failures, texts)


def check_compact_vocabulary(task_cls: type[Task], model_cfg) -> None:
    """A model decodes a task's compact format only with exactly its vocabulary and special ids: a larger
    vocabulary samples ids the format has no meaning for (reward 0 throughout, silently). ``ValueError``
    naming both otherwise (a task without a compact format is left to :class:`CompactAdapter`)."""
    if not getattr(task_cls, "supports_compact", False):
        return
    tok = task_cls.compact_tokenizer()
    want = (tok.vocab_size, tok.mask_id, tok.eos_id)
    have = (model_cfg.vocab_size, model_cfg.mask_token_id, model_cfg.eos_token_id)
    if have != want:
        raise ValueError(f"the model's vocabulary ({have[0]} ids, mask {have[1]}, eos {have[2]}) does not fit the "
                         f"compact format of task {task_cls.name!r} ({want[0]} ids, mask {want[1]}, eos {want[2]})")


def check_tokenizer_vocabulary(tokenizer, model_cfg) -> None:
    """Every id of the tokenizer must have a row in the model's embedding and head (``ValueError`` otherwise)."""
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary only "
                         f"{model_cfg.vocab_size}: this tokenizer does not belong to this model")


def make_adapter(task: Task, fmt: str, prompt_length: int, model_cfg, tokenizer=None, **kw):
    if fmt == "compact":
        check_compact_vocabulary(type(task), model_cfg)
        return CompactAdapter(task, prompt_length, model_cfg.pad_token_id, model_cfg.eos_token_id)
    if tokenizer is None:
        raise ValueError("task.format=chat needs a tokenizer: set model.tokenizer (a local tokenizer directory)")
    check_tokenizer_vocabulary(tokenizer, model_cfg)
    return ChatAdapter(task, tokenizer, prompt_length, **kw)
