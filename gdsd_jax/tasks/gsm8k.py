"""GSM8K: loader of local files, the official ``gsm8k_xml`` and ``gsm8k`` rewards and prompts.

Files are JSONL or Parquet with the public dataset's columns (``openai/gsm8k`` ``main``): ``question`` and
``answer`` (the worked solution ending in ``#### <final answer>``). Nothing is downloaded.

Variants (``GSM8KTask(variant=...)``):

* ``"xml"`` (the GDSD GSM8K recipe, ``gsm8k_xml``): XML answer-format prompt; 5 reward functions summing to at
  most 4.0 (``xmlcount`` 0.5, ``soft_format`` 0.5, ``strict_format`` 0.5, ``int`` 0.5, ``correctness`` 2.0);
* ``"plain"`` (``gsm8k``): "Please reason step by step, and put your final answer within \\boxed{}."; one
  reward, 1.0 when ``extract_answer`` equals the gold answer.
"""

from __future__ import annotations

import re

from gdsd_jax.tasks.base import MathWordTask, WeightedReward, per_completion
from gdsd_jax.tasks.files import DataError, is_nonempty_str, load_rows
from gdsd_jax.tasks.text import boxed_contents, first_answer_text, hash_answer, xml_answer


def load_gsm8k(path) -> list[dict]:
    """Rows ``{question, answer}`` -> examples ``{"question", "answer": gold after ####, "solution": full}``."""

    def convert(row: dict, rowno: int) -> dict:
        gold = hash_answer(row["answer"])
        if gold is None or not gold:
            raise DataError(path, rowno, "answer", "expected a solution ending in '#### <final answer>'")
        return {"question": row["question"], "answer": gold, "solution": row["answer"]}

    return load_rows(path, {"question": is_nonempty_str, "answer": is_nonempty_str}, convert=convert)


# ------------------------------------------------------------------------------------------------
# gsm8k_xml rewards


def count_xml(text: str) -> float:
    """+0.125 for each of ``<reasoning>\\n``, ``\\n</reasoning>\\n``, ``\\n<answer>\\n``, ``\\n</answer>``
    occurring exactly once; with the third, minus 0.001 per character after the last ``\\n<answer>\\n``;
    with the fourth, minus 0.001 per character after the last ``\\n</answer>`` beyond the first."""
    score = 0.0
    if text.count("<reasoning>\n") == 1:
        score += 0.125
    if text.count("\n</reasoning>\n") == 1:
        score += 0.125
    if text.count("\n<answer>\n") == 1:
        score += 0.125
        score -= len(text.split("\n<answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        score += 0.125
        score -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return score


_SOFT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
_STRICT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$", re.DOTALL)


@per_completion
def xmlcount_reward(text: str, example: dict) -> float:
    return count_xml(text)


@per_completion
def soft_format_reward(text: str, example: dict) -> float:
    """0.5 if the text starts with ``<reasoning>...</reasoning>`` then ``<answer>...</answer>``."""
    return 0.5 if _SOFT.match(text) else 0.0


@per_completion
def strict_format_reward(text: str, example: dict) -> float:
    """0.5 for exactly ``<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n``."""
    return 0.5 if _STRICT.match(text) else 0.0


@per_completion
def int_reward(text: str, example: dict) -> float:
    """0.5 if the stripped answer text is all digits."""
    return 0.5 if xml_answer(text).isdigit() else 0.0


@per_completion
def correctness_reward(text: str, example: dict) -> float:
    """2.0 if the stripped answer text equals the gold ``####`` answer string."""
    return 2.0 if xml_answer(text) == example["answer"] else 0.0


# ------------------------------------------------------------------------------------------------
# gsm8k (plain)

_THE_ANSWER_IS = re.compile(r"The answer is (\-?[0-9\.,]+).")
_HASHES = re.compile(r"#### (\-?[0-9\.,]+)")
_INTEGER = re.compile(r"(\-?[0-9]+)")


def extract_answer(text: str) -> str:
    """"The answer is X." first, then "#### X", then the last integer; "" if none."""
    m = _THE_ANSWER_IS.search(text)
    if m:
        return m.group(1).strip()
    m = _HASHES.search(text)
    if m:
        return m.group(1).strip()
    ints = _INTEGER.findall(text)
    return ints[-1].strip() if ints else ""


@per_completion
def plain_correctness_reward(text: str, example: dict) -> float:
    """1.0 if :func:`extract_answer` equals the gold answer string."""
    return 1.0 if extract_answer(text) == example["answer"] else 0.0


# ------------------------------------------------------------------------------------------------
# evaluation


def _to_float(s: str) -> float | None:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def eval_correct(text: str, gold: str) -> bool:
    """Official GSM8K evaluation: the first parsable ``\\boxed{}`` content as a float, otherwise the last
    number inside ``<answer>``; equal to the gold as floats."""
    gold_value = _to_float(gold)
    if gold_value is None:
        return False
    pred = None
    for box in boxed_contents(text):
        pred = _to_float(box)
        if pred is not None:
            break
    if pred is None:
        answer, has_tag = first_answer_text(text)
        if has_tag:
            numbers = re.findall(r"-?[0-9][0-9,]*\.?[0-9]*", answer)
            pred = _to_float(numbers[-1]) if numbers else None
    return pred is not None and pred == gold_value


@per_completion
def eval_accuracy(text: str, example: dict) -> float:
    """1.0 if :func:`eval_correct` accepts the completion for the example's gold answer."""
    return float(eval_correct(text, example["answer"]))


class GSM8KTask(MathWordTask):
    """GSM8K from local files (see module docstring). ``train_file`` / ``test_file``: JSONL or Parquet."""

    name = "gsm8k"

    display_name = "GSM8K"
    columns = "'question' and 'answer' (the openai/gsm8k 'main' layout)"
    variants = {"xml": "gsm8k_xml", "plain": "gsm8k"}

    def load(self, path) -> list[dict]:
        return load_gsm8k(path)

    def rewards(self) -> list[WeightedReward]:
        if self.variant == "plain":
            return [WeightedReward("gsm8k_correctness", plain_correctness_reward)]
        return [
            WeightedReward("xmlcount", xmlcount_reward),
            WeightedReward("soft_format", soft_format_reward),
            WeightedReward("strict_format", strict_format_reward),
            WeightedReward("int", int_reward),
            WeightedReward("correctness", correctness_reward),
        ]

    def eval_metrics(self, completions, examples) -> dict[str, list[float]]:
        return {"accuracy": eval_accuracy(completions, examples)}
