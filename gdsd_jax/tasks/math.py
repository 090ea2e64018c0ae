"""MATH: loader of local files, the official ``math_xml`` and ``math`` rewards and prompts.

Files are JSONL or Parquet with the public datasets' columns: ``problem``, ``solution`` (a worked solution
with a ``\\boxed{}`` final answer) and optionally ``answer`` (MATH-500). The gold answer is extracted from
``solution`` with :func:`~gdsd_jax.tasks.text.last_boxed`, as officially; ``answer`` is kept for reference.

Variants (``MathTask(variant=...)``):

* ``"xml"`` (GDSD MATH recipe, ``math_xml``): ``correctness`` 2.0 if the last ``\\boxed{}`` of the answer text
  is equivalent (:func:`~gdsd_jax.tasks.text.is_equiv`) to the gold's; plus ``boxed_format`` =
  0.5 x (1.0 if ``<answer>`` is present + (1.0 if ``\\boxed`` is in the answer text else 0.5)), i.e. 0.25..1.0;
  maximum total 3.0;
* ``"plain"`` (``math``): 2.0 if ``math_verify.verify(parse(response), parse(solution))`` (the official call
  order), with the ``math-verify`` package.
"""

from __future__ import annotations

import threading

from gdsd_jax.tasks.base import MathWordTask, WeightedReward, per_completion
from gdsd_jax.tasks.files import DataError, is_nonempty_str, is_str, load_rows
from gdsd_jax.tasks.text import XML_FORMAT, first_answer_text, is_equiv, last_boxed, remove_boxed

XML_INSTRUCTION = "\n\nYou are a math expert. Solve the problem step by step. Wrap the final answer in a \\boxed{}.\n\n"


def gold_answer(solution: str) -> str | None:
    """The gold answer of a MATH solution: the content of its last ``\\boxed{}``."""
    return remove_boxed(last_boxed(solution))


def load_math(path) -> list[dict]:
    """Rows ``{problem, solution[, answer]}`` -> examples ``{"problem", "solution", "answer"}``."""

    def convert(row: dict, rowno: int) -> dict:
        solution = row["solution"]
        if "\\boxed" not in solution and "\\fbox" not in solution:
            raise DataError(path, rowno, "solution", "expected a worked solution with a \\boxed{} final answer")
        if last_boxed(solution) is None:
            raise DataError(path, rowno, "solution", "the last \\boxed{ never closes (unbalanced braces): the "
                            "final answer cannot be read")
        answer = row.get("answer")
        return {"problem": row["problem"], "solution": solution,
                "answer": answer if isinstance(answer, str) else gold_answer(solution)}

    return load_rows(path, {"problem": is_nonempty_str, "solution": is_nonempty_str},
                     optional={"answer": is_str}, convert=convert)


def math_xml_correct(text: str, solution: str) -> bool:
    answer_text, _ = first_answer_text(text)
    return is_equiv(remove_boxed(last_boxed(answer_text)), gold_answer(solution))


@per_completion
def correctness_reward_xml(text: str, example: dict) -> float:
    """2.0 if the answer text's last box is equivalent to the gold solution's last box."""
    return 2.0 if math_xml_correct(text, example["solution"]) else 0.0


@per_completion
def boxed_format_reward(text: str, example: dict) -> float:
    """0.5 x (1.0 if ``<answer>`` is present + (1.0 if ``\\boxed`` in the answer text else 0.5))."""
    answer_text, has_tag = first_answer_text(text)
    return 0.5 * ((1.0 if has_tag else 0.0) + (1.0 if "\\boxed" in answer_text else 0.5))


def verify_math(response: str, gold: str) -> bool:
    """``math_verify.verify(parse(response), parse(gold))`` (official argument order).

    ``math-verify`` bounds its work with SIGALRM timeouts, which only work in the main thread; elsewhere the
    timeouts are disabled (reward scoring is then unbounded in time for pathological inputs).
    """
    from math_verify import parse, verify  # lazy: heavy (sympy, antlr), only the MATH task needs it

    in_main = threading.current_thread() is threading.main_thread()
    kw = {} if in_main else {"parsing_timeout": None}
    pred, ref = parse(response, **kw), parse(gold, **kw)
    return bool(verify(pred, ref, **({} if in_main else {"timeout_seconds": None})))


@per_completion
def correctness_reward_plain(text: str, example: dict) -> float:
    """2.0 if math-verify finds the response equivalent to the gold solution."""
    return 2.0 if verify_math(text, example["solution"]) else 0.0


@per_completion
def eval_accuracy(text: str, example: dict) -> float:
    """MATH-500 evaluation: 1.0 if the last box of the answer text is equivalent (``is_equiv``) to the gold
    answer."""
    answer_text, _ = first_answer_text(text)
    return float(is_equiv(remove_boxed(last_boxed(answer_text)), example["answer"]))


class MathTask(MathWordTask):
    """MATH from local files (see module docstring). ``train_file`` / ``test_file``: JSONL or Parquet."""

    name = "math"

    display_name = "MATH"
    columns = "'problem' and 'solution' (and optionally 'answer')"
    variants = {"xml": "math_xml", "plain": "math"}
    question_field = "problem"
    xml_prefix = XML_FORMAT + XML_INSTRUCTION

    def load(self, path) -> list[dict]:
        return load_math(path)

    def rewards(self) -> list[WeightedReward]:
        if self.variant == "plain":
            return [WeightedReward("math_correctness", correctness_reward_plain)]
        return [
            WeightedReward("correctness", correctness_reward_xml),
            WeightedReward("boxed_format", boxed_format_reward),
        ]

    def eval_metrics(self, completions, examples) -> dict[str, list[float]]:
        return {"accuracy": eval_accuracy(completions, examples)}
