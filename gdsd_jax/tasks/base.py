"""The task contract and the task registry.

A task owns its data (generator or loader), its prompt formats and its reward functions. Everything a
trainer needs goes through :class:`Task`; the trainer never imports a task module directly.

Two prompt formats exist:

* the **official chat prompt** (``prompt_messages`` + ``prompt_prefill``) for LLaDA / Dream, whose text goes
  through a tokenizer's chat template (see :mod:`gdsd_jax.tasks.prompts`); training and evaluation prompts
  differ (``split="train"`` vs ``split="test"``), as in the official code;
* a **compact token format** for the tiny default model (Sudoku and Countdown only): the prompt is a short
  list of token ids, the completion a fixed number of ids, scored by ``compact_reward``.

An **evaluation protocol** fixes the test set, the evaluation prompts, the answer parser and how the
per-completion metrics are aggregated. Every task has the project's own (``"project"``); Sudoku and
Countdown also offer the official GDSD evaluation (``"official"``: its test files, prompts, parser and
aggregation), chosen with the constructor argument ``protocol``. Training data never overlap the test set of
the protocol in use.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gdsd_jax.errors import UserError
from gdsd_jax.tasks.text import BOXED_SUFFIX, MATH_EVAL_PROMPT, XML_FORMAT

log = logging.getLogger(__name__)


class TaskError(UserError, ValueError):
    """An unknown task name or an argument its constructor does not take."""

#: A reward function scores a batch: (completions, examples) -> one float per completion. It must be
#: total: a malformed completion scores 0 (or the format score) and never raises.
RewardFn = Callable[[Sequence[str], Sequence[dict]], list[float]]


def per_completion(rule: Callable[[str, dict], float]) -> RewardFn:
    """A rule ``(completion, example) -> number`` as a total batch function: ``float(rule(c, e))`` for each
    pair, 0.0 where the rule raises (a malformed completion or example scores 0, the others are kept)."""

    def batch(completions: Sequence[str], examples: Sequence[dict]) -> list[float]:
        out = []
        for c, e in zip(completions, examples):
            try:
                out.append(float(rule(c, e)))
            except Exception:
                out.append(0.0)
        return out

    batch.__name__ = rule.__name__
    batch.__doc__ = rule.__doc__
    return batch


#: Evaluation protocol names (see the module docstring).
PROTOCOLS = ("project", "official")


@dataclasses.dataclass(frozen=True)
class WeightedReward:
    name: str
    fn: RewardFn
    weight: float = 1.0


class Task:
    """Base class. Subclasses set ``name`` and implement the methods below.

    Examples are plain dicts (JSON-serialisable) so they go through Grain and into eval JSONL unchanged.
    """

    name: str = ""

    def examples(self, split: str) -> Sequence[dict]:
        """All examples of ``split`` (``"train"`` or ``"test"``)."""
        raise NotImplementedError

    def prompt_messages(self, example: dict, *, split: str = "train") -> list[dict]:
        """Chat messages (``[{"role": ..., "content": ...}]``) of the official prompt for ``split``."""
        raise NotImplementedError

    #: Prefill of the evaluation prompts (the official evaluation's ``"<reasoning>"`` for the tasks it has).
    eval_prefill: str = ""

    def prompt_prefill(self, *, split: str = "train") -> str:
        """Text appended after the chat template's generation prompt (the start of the answer):
        :attr:`eval_prefill` for evaluation prompts; training prompts have no prefill."""
        return "" if split == "train" else self.eval_prefill

    def rewards(self) -> list[WeightedReward]:
        """Reward functions and weights of the official recipe (summed into one scalar reward)."""
        raise NotImplementedError

    #: Evaluation protocols this task offers, and the one in use (module docstring).
    protocols: tuple[str, ...] = ("project",)
    protocol: str = "project"

    @property
    def eval_reads_raw_generation(self) -> bool:
        """Whether :meth:`eval_metrics` reads every generated token decoded with special tokens kept instead
        of the completion up to its first EOS without special tokens: under the official protocol, which
        decodes all ``L`` tokens so (its Sudoku parser stops at ``<|eot_id|>`` and ``<|endoftext|>``)."""
        return self.protocol == "official"

    def eval_metrics(self, completions: Sequence[str], examples: Sequence[dict]) -> dict[str, list[float]]:
        """Evaluation metrics per completion: name -> one float per completion (``"accuracy"`` is the
        headline). Evaluation reports :meth:`aggregate_metrics` of them.

        The default is the summed training reward; tasks with an evaluation parser override it.
        """
        rewards, _, _ = score_batch(self, completions, examples)
        return {"accuracy": rewards.tolist()}

    def aggregate_metrics(self, metrics: dict[str, list[float]]) -> dict[str, float]:
        """Set-level numbers from the per-completion :meth:`eval_metrics` of a whole test set: by default
        the mean of each metric (fractions, not percent)."""
        return {name: float(np.mean(values)) if len(values) else 0.0 for name, values in metrics.items()}

    # ---- compact token format (tiny model); only Sudoku and Countdown implement it ----
    supports_compact: bool = False

    def compact_tokenizer(self):
        """The :class:`gdsd_jax.data.tokenizer.CharTokenizer` of the compact format."""
        raise NotImplementedError(f"task {self.name!r} has no compact token format")

    def compact_prompt(self, example: dict) -> list[int]:
        """Prompt token ids of ``example`` in the compact format."""
        raise NotImplementedError(f"task {self.name!r} has no compact token format")

    def compact_solution(self, example: dict) -> list[int]:
        """Completion token ids of a correct answer (SFT target), padded to ``compact_completion_length``."""
        raise NotImplementedError(f"task {self.name!r} has no compact token format")

    def compact_reward(self, completion_ids: Sequence[int], example: dict) -> float:
        """Reward of one compact completion (total: never raises on any id sequence)."""
        raise NotImplementedError(f"task {self.name!r} has no compact token format")

    compact_prompt_length: int = 0
    compact_completion_length: int = 0


def check_protocol(setting: str, protocol: str, offered: Sequence[str]) -> str:
    """``protocol`` if it is one of ``offered``, else a ``ValueError`` naming ``setting`` and the choices."""
    if protocol not in offered:
        raise ValueError(f"{setting} must be one of {list(offered)}, got {protocol!r}")
    return protocol


class LocalFileTask(Task):
    """A task whose data are user-supplied local files (JSONL or Parquet), one per split, loaded once.

    Subclasses set ``name``, ``display_name`` and ``columns`` (for the error message when a file is missing)
    and implement ``load(path)``.
    """

    display_name: str = ""
    columns: str = ""

    def __init__(self, *, train_file=None, test_file=None):
        self.files = {"train": train_file, "test": test_file}
        self._cache: dict[str, list[dict]] = {}

    def load(self, path) -> list[dict]:
        raise NotImplementedError

    def examples(self, split: str) -> list[dict]:
        if split not in self.files:
            raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
        if self.files[split] is None:
            raise ValueError(f"{self.display_name} is not bundled: pass {split}_file= a local JSONL/Parquet file "
                             f"with columns {self.columns}")
        if split not in self._cache:
            self._cache[split] = self.load(self.files[split])
        return self._cache[split]


class MathWordTask(LocalFileTask):
    """A math word-problem task from local files (GSM8K, MATH) with the official prompts: per ``variant``,
    the XML format block or the boxed-answer instruction for training, the math evaluation prompt for the
    test split.

    Subclasses set, besides :class:`LocalFileTask`'s, ``variants`` (variant -> the official reward recipe's
    name), ``question_field`` (the example's question) and ``xml_prefix`` (what the XML training prompt puts
    before the question).
    """

    variants: dict[str, str] = {}
    question_field: str = "question"
    xml_prefix: str = XML_FORMAT + "\n\n"
    eval_prefill = "<reasoning>"

    def __init__(self, *, train_file=None, test_file=None, variant: str = "xml"):
        if variant not in self.variants:
            expected = " or ".join(f"{v!r} ({r})" for v, r in self.variants.items())
            raise ValueError(f"{type(self).__name__} variant must be {expected}, got {variant!r}")
        super().__init__(train_file=train_file, test_file=test_file)
        self.variant = variant

    def prompt_messages(self, example: dict, *, split: str = "train") -> list[dict]:
        question = example[self.question_field]
        if split != "train":
            content = MATH_EVAL_PROMPT + "\n\n" + question
        elif self.variant == "xml":
            content = self.xml_prefix + question
        else:
            content = question + BOXED_SUFFIX
        return [{"role": "user", "content": content}]


class GeneratedTask(Task):
    """A task with generated data (Sudoku, Countdown): a train set made at load time, shipped generated test
    and validation files, and with ``protocol="official"`` the official test set; a local file
    (``train_file`` / ``test_file`` / ``validation_file``) replaces any of them. Each split is made once.

    Subclasses set ``name``, ``load_file(path)`` (a user or shipped file), ``load_official_test(path)``
    (``path`` None: the shipped official copy), ``shipped_test_path()`` and ``shipped_validation_path()``,
    and implement :meth:`train_examples`.
    """

    protocols = ("project", "official")
    eval_prefill = "<reasoning>"
    supports_compact = True
    splits = ("train", "validation", "test")

    def __init__(self, *, train_file=None, test_file=None, validation_file=None, protocol: str = "project"):
        self.train_file, self.test_file, self.validation_file = train_file, test_file, validation_file
        self.protocol = check_protocol(f"{type(self).__name__} protocol", protocol, self.protocols)
        self._cache: dict[str, list[dict]] = {}

    def examples(self, split: str) -> list[dict]:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; expected 'train', 'validation' or 'test'")
        if split not in self._cache:
            if split == "train":
                self._cache[split] = self.train_examples()
            elif split == "validation":
                self._cache[split] = self.load_file(self.validation_file or self.shipped_validation_path())
            elif self.protocol == "official":
                self._cache[split] = self.load_official_test(self.test_file)
            else:
                self._cache[split] = self.load_file(self.test_file or self.shipped_test_path())
        return self._cache[split]

    def train_examples(self) -> list[dict]:
        """The train split, none of it a test example of the protocol in use."""
        raise NotImplementedError

    def load_file(self, path) -> list[dict]:
        raise NotImplementedError

    def load_official_test(self, path=None) -> list[dict]:
        raise NotImplementedError

    def shipped_test_path(self) -> Path:
        raise NotImplementedError

    def shipped_validation_path(self) -> Path:
        raise NotImplementedError


def _as_scores(values: Any, n: int) -> list[float] | None:
    """``values`` as ``n`` finite floats, or None if it is not that."""
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def score_batch(
    task: Task, completions: Sequence[str], examples: Sequence[dict]
) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Score ``N`` completions with every reward function of ``task``.

    Returns ``(rewards, per_fn, num_failures)``:

    * ``rewards``: float32 ``[N]``, the weighted sum over reward functions;
    * ``per_fn``: reward-function name -> float32 ``[N]`` (unweighted);
    * ``num_failures``: number of (completion, reward function) pairs whose function raised or returned
      something other than one finite float per completion (such a pair scores 0), plus the failures a
      reward function reports itself through a ``last_failures`` attribute (the code pass rate counts
      programs the sandbox could not start). Reward functions are written to be total, so a non-zero count
      points at a bug or an infrastructure problem; it is reported, never raised.

    A reward function that raises on the batch is called again one completion at a time, so one bad
    completion does not zero the others.
    """
    n = len(completions)
    if len(examples) != n:
        raise ValueError(f"score_batch: {n} completions but {len(examples)} examples")
    total = np.zeros(n, dtype=np.float64)
    per_fn: dict[str, np.ndarray] = {}
    failures = 0
    for wr in task.rewards():
        scores = None
        try:
            scores = _as_scores(wr.fn(completions, examples), n)
        except Exception as exc:  # a reward must never stop training: localise, count, score 0
            log.warning("reward %s raised on a batch of %d: %r; scoring one by one", wr.name, n, exc)
        if scores is None:
            scores = []
            for c, e in zip(completions, examples):
                try:
                    one = _as_scores(wr.fn([c], [e]), 1)
                except Exception:
                    one = None
                if one is None:
                    failures += 1
                    scores.append(0.0)
                else:
                    scores.append(one[0])
        failures += int(getattr(wr.fn, "last_failures", 0) or 0)
        arr = np.asarray(scores, dtype=np.float64)
        per_fn[wr.name] = arr.astype(np.float32)
        total += wr.weight * arr
    return total.astype(np.float32), per_fn, failures


_REGISTRY: dict[str, str] = {
    # name -> "module:Class"; imported on first use.
    "sudoku": "gdsd_jax.tasks.sudoku:SudokuTask",
    "countdown": "gdsd_jax.tasks.countdown:CountdownTask",
    "gsm8k": "gdsd_jax.tasks.gsm8k:GSM8KTask",
    "math": "gdsd_jax.tasks.math:MathTask",
    "code": "gdsd_jax.tasks.code:CodeTask",
}


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def task_class(name: str) -> type[Task]:
    """The class of a registered task (its module is imported on first use)."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; expected one of {task_names()}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def task_arguments(name: str) -> list[str]:
    """Keyword arguments the task's constructor accepts (what ``task.kwargs`` / ``eval KEY=VALUE`` may set).

    ``protocol`` is accepted by every task (one with the project's protocol only takes ``project``).
    """
    params = inspect.signature(task_class(name)).parameters.values()
    names = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names if "protocol" in names else [*names, "protocol"]


def check_task_arguments(name: str, kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`TaskError` naming an unknown task, an argument its constructor does not take, or a
    protocol it does not offer (:attr:`Task.protocols`)."""
    valid = task_arguments(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TaskError(f"task {name!r} takes no argument(s) {unknown}; valid: {valid}")
    if "protocol" in kwargs:
        try:
            check_protocol(f"the protocol of task {name!r}", kwargs["protocol"], task_class(name).protocols)
        except ValueError as e:
            raise TaskError(str(e)) from None


def get_task(name: str, **kwargs: Any) -> Task:
    """Instantiate a registered task by name; keyword arguments go to its constructor.

    A task with the project's protocol only takes no ``protocol`` argument, so ``protocol="project"`` is
    accepted and dropped for it.
    """
    check_task_arguments(name, kwargs)
    cls = task_class(name)
    if len(cls.protocols) == 1:
        kwargs = {k: v for k, v in kwargs.items() if k != "protocol"}
    return cls(**kwargs)
