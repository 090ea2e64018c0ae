"""Code generation: local JSONL with ``question`` and ``test_cases``; official format reward + pass rate.

Rows: ``question`` (str) and ``test_cases`` (non-empty list of str, each a snippet such as
``assert f(1) == 2``), the layout of the AceCode-style data the official code reads (not bundled).

Rewards (maximum total 2.0):

* ``code_format``: 1.0 if the whole response is text followed by exactly one final ```` ```python ```` fenced
  block (nothing but an optional newline after it) whose code parses with :mod:`ast`; 0.5 if it does not
  parse (SyntaxError); 0 otherwise;
* ``code_pass_rate``: only when the format reward is 1.0: the fraction of the example's test cases that
  pass, each run after the program in the :mod:`~gdsd_jax.tasks.sandbox` (1 s per test by default, 4
  programs in parallel). Programs containing ``import os``, ``threading``, ``multiprocessing``, ``shutil``,
  ``torch`` or ``sklearn`` score 0 without running (official rule). A test's checks are judged outside the
  program's process, on the values it computed (:mod:`~gdsd_jax.tasks.checks`); ``comparison="strict"``
  (default) also requires the type of each compared value to match (``2.0 == 2`` fails, and no object of the
  program decides a comparison), ``comparison="python"`` compares with Python's ``==`` like the official
  assert, for evaluation parity.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Mapping, Sequence

from gdsd_jax.tasks.base import LocalFileTask, TaskError, WeightedReward
from gdsd_jax.tasks.checks import COMPARISONS
from gdsd_jax.tasks.files import is_nonempty_str, is_nonempty_str_list, load_rows
from gdsd_jax.tasks.sandbox import Sandbox, SandboxConfig, default_sandbox

SYSTEM_PROMPT = (
    "You are a helpful assistant. When you output code, it must be in a single fenced code block using triple "
    "backticks and the language specifier. The code block must be the last part of your response."
)
BANNED_SUBSTRINGS = ("import os", "threading", "multiprocessing", "shutil", "torch", "sklearn")

_FORMAT = re.compile(r"^(?:(?!```)[\s\S])*?```python\n(?:(?!```)[\s\S])*?```\n?$", re.DOTALL)
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def load_code(path) -> list[dict]:
    """Rows ``{question, test_cases}`` -> examples with the same keys (test_cases as a list)."""
    return load_rows(path, {"question": is_nonempty_str, "test_cases": is_nonempty_str_list},
                     convert=lambda row, _: {"question": row["question"], "test_cases": list(row["test_cases"])})


def extract_code(text: str) -> str:
    """The first ```` ```python ```` block's code ("" if none)."""
    m = _BLOCK.search(text)
    return m.group(1) if m else ""


def format_score(text: str) -> float:
    if not isinstance(text, str) or not _FORMAT.fullmatch(text):
        return 0.0
    blocks = _BLOCK.findall(text)
    if not blocks:
        return 0.0
    try:
        ast.parse(blocks[0].strip())
        return 1.0
    except SyntaxError:
        return 0.5
    except Exception:  # e.g. null bytes (ValueError on some Python versions)
        return 0.0


def code_format_reward(completions: Sequence[str], examples: Sequence[dict]) -> list[float]:
    """Official code format reward (1.0 / 0.5 / 0)."""
    return [format_score(c) for c in completions]


class CodePassRate:
    """The pass-rate reward as a callable; ``last_failures`` counts sandbox infrastructure failures of the
    last call (reported by :func:`~gdsd_jax.tasks.base.score_batch`)."""

    __name__ = "code_pass_rate"

    def __init__(self, sandbox: Sandbox | None = None, banned: Sequence[str] = BANNED_SUBSTRINGS,
                 comparison: str = "strict"):
        if comparison not in COMPARISONS:
            raise ValueError(f"code task: comparison must be one of {COMPARISONS}, got {comparison!r}")
        self.comparison = comparison
        self._sandbox = sandbox
        self.banned = tuple(banned)
        self.last_failures = 0
        self.last_results: list = []

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = default_sandbox()
        return self._sandbox

    def __call__(self, completions: Sequence[str], examples: Sequence[dict]) -> list[float]:
        jobs: list[tuple[int, str, str]] = []  # (completion index, program, test)
        for i, (text, ex) in enumerate(zip(completions, examples)):
            if format_score(text) < 1.0:
                continue
            program = extract_code(text)
            if any(b in program for b in self.banned):
                continue
            tests = ex.get("test_cases") or []
            for test in tests:
                jobs.append((i, program, str(test)))
        results = self.sandbox.run_many([j[1] for j in jobs], [j[2] for j in jobs], self.comparison) if jobs else []
        self.last_results = results
        self.last_failures = sum(r.infrastructure_failure for r in results)
        passed = [0] * len(completions)
        counts = [0] * len(completions)
        for (i, _, _), r in zip(jobs, results):
            counts[i] += 1
            passed[i] += int(r.passed)
        return [passed[i] / counts[i] if counts[i] else 0.0 for i in range(len(completions))]


class CodeTask(LocalFileTask):
    """Code generation from local JSONL (see module docstring).

    Args:
      train_file / test_file: JSONL (or Parquet) with ``question`` and ``test_cases``.
      sandbox: a :class:`~gdsd_jax.tasks.sandbox.Sandbox`, or ``sandbox_config`` (a
        :class:`~gdsd_jax.tasks.sandbox.SandboxConfig` or its fields as a mapping, e.g. ``{namespaces: auto}``
        in ``task.kwargs``) to build one (default: the process-wide default sandbox). It is made here, so a
        required isolation layer the host cannot give fails at construction.
      comparison: ``"strict"`` (default, for training: type and value must match) or ``"python"`` (the
        official assert rule on built-in values, for evaluation parity); see the module docstring.
    """

    name = "code"
    display_name = "The code dataset"
    columns = "'question' and 'test_cases'"

    def __init__(self, *, train_file=None, test_file=None, sandbox: Sandbox | None = None,
                 sandbox_config: SandboxConfig | Mapping | None = None, comparison: str = "strict"):
        super().__init__(train_file=train_file, test_file=test_file)
        if sandbox is None and sandbox_config is not None:
            if isinstance(sandbox_config, Mapping):  # from a YAML file: task.kwargs.sandbox_config
                try:
                    sandbox_config = SandboxConfig(**sandbox_config)
                except (TypeError, ValueError) as e:
                    raise TaskError(f"task 'code': sandbox_config: {e}") from None
            sandbox = Sandbox(sandbox_config)
        # Made now, not at the first reward: a layer the host cannot give stops the run at start
        # (SandboxUnavailable), before anything is built or written.
        self.pass_rate = CodePassRate(sandbox or default_sandbox(), comparison=comparison)
        self._check_data_is_hidden()

    def _check_data_is_hidden(self) -> None:
        """The test asserts must not be readable by the programs: a data file inside a directory the sandbox
        shows them (e.g. kept inside the interpreter's venv) is refused."""
        shown = [os.path.realpath(p) for p in self.pass_rate.sandbox.visible_paths()]
        for split, path in self.files.items():
            if path is None:
                continue
            real = os.path.realpath(path)
            for root in shown:
                if real == root or real.startswith(root + os.sep):
                    raise TaskError(f"task 'code': the {split} file {path} lies inside {root}, which the sandbox "
                                    f"shows to every program it runs (the interpreter's install or the system's "
                                    f"libraries); move the data outside it")

    def load(self, path) -> list[dict]:
        return load_code(path)

    def prompt_messages(self, example: dict, *, split: str = "train") -> list[dict]:
        question = example["question"]
        if "\n```\n" not in question:
            question += "\nTest cases: " + example["test_cases"][0]
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]

    def rewards(self) -> list[WeightedReward]:
        return [WeightedReward("code_format", code_format_reward), WeightedReward("code_pass_rate", self.pass_rate)]

    def eval_metrics(self, completions, examples) -> dict[str, list[float]]:
        rates = self.pass_rate(completions, examples)
        return {"accuracy": [float(r == 1.0) for r in rates], "pass_rate": rates}
