"""Text helpers shared by the reward functions: answer tags, ``\\boxed{}`` extraction and the MATH answer
normalisation.

The rules follow the official GDSD reward code (``gdsd/rewards.py`` and its ``math500_utils``; see
``docs/tasks.md``), re-implemented here. The MATH normalisation is the one of Hendrycks et al.'s MATH
evaluation (``strip_string``), which is what ``is_equiv`` compares.
"""

from __future__ import annotations

import re

#: The XML answer format block of the official training prompts (GSM8K, MATH, Countdown).
XML_FORMAT = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"

#: The boxed-answer instruction after the question of the official ``gsm8k`` and ``math`` training prompts.
BOXED_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."

#: The system prompt of the official math evaluation (``math_eval``: GSM8K and MATH-500), put before the question.
MATH_EVAL_PROMPT = (
    "You are a math expert. You will be given a question to solve. Solve it step by step. Wrap the final answer "
    "in a \\boxed{}. \nRespond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n"
    "<answer>\n\\boxed{...}\n</answer>\n"
)

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def last_answer_tag(text: str) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` (stripped), or None if there is none.

    Used by the Sudoku and Countdown rewards (regex over the whole text, newlines allowed inside).
    """
    matches = _ANSWER_TAG.findall(text)
    return matches[-1].strip() if matches else None


def xml_answer(text: str) -> str:
    """GSM8K-XML answer: the text after the LAST ``<answer>`` up to the next ``</answer>``, stripped.

    Without any tag this is the whole text (stripped): the official ``extract_xml_answer``.
    """
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def first_answer_text(text: str) -> tuple[str, bool]:
    """MATH-XML answer text: between the FIRST ``<answer>`` and the following ``</answer>``.

    Returns ``(answer_text, has_answer_tag)``. Without ``<answer>`` the whole response is the answer text;
    with ``<answer>`` but no closing tag, everything after ``<answer>``.
    """
    if "<answer>" not in text:
        return text, False
    return text.split("<answer>", 1)[1].split("</answer>", 1)[0], True


def hash_answer(text: str) -> str | None:
    """GSM8K gold answer: the text after the first ``####``, stripped (None without ``####``)."""
    if "####" not in text:
        return None
    return text.split("####", 1)[1].strip()


# ------------------------------------------------------------------------------------------------
# \boxed{} extraction


def last_boxed(text: str) -> str | None:
    """The last ``\\boxed{...}`` (or ``\\fbox{...}``) including the command, with balanced braces.

    Conventions of the official helper: ``"\\boxed 5"`` (space form) gives ``"\\boxed 5"`` up to a ``$``;
    a text without any box is returned unchanged; an unclosed box gives None.
    """
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return text
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def remove_boxed(s: str | None) -> str | None:
    """Strip the ``\\boxed{`` ... ``}`` (or ``\\boxed ``) wrapper; anything else is returned as is."""
    if s is None:
        return None
    if "\\boxed " in s:
        prefix = "\\boxed "
        return s[len(prefix) :] if s.startswith(prefix) else s
    prefix = "\\boxed{"
    if s.startswith(prefix) and s.endswith("}"):
        return s[len(prefix) : -1]
    return s


def boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` in order (balanced braces; unclosed boxes are skipped)."""
    out = []
    pos = 0
    while True:
        start = text.find("\\boxed{", pos)
        if start < 0:
            return out
        depth = 0
        end = None
        for i in range(start + len("\\boxed"), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    end = i
                    break
        if end is None:
            return out
        out.append(text[start + len("\\boxed{") : end])
        pos = end + 1


# ------------------------------------------------------------------------------------------------
# MATH answer normalisation (Hendrycks et al.)


def _fix_fracs(s: str) -> str:
    # "\frac12" -> "\frac{1}{2}", "\frac1{2}" -> "\frac{1}{2}"
    parts = s.split("\\frac")
    if len(parts) <= 1:
        return s
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if not part:
            return s
        if part[0] == "{":
            out += part
            continue
        if len(part) < 2:
            return s
        a, b, rest = part[0], part[1], part[2:]
        out += "{" + a + "}{" + b + "}" + rest if b != "{" else "{" + a + "}" + b + rest
    return out


def _fix_a_slash_b(s: str) -> str:
    # "3/4" (two plain integers) -> "\frac{3}{4}"
    pieces = s.split("/")
    if len(pieces) != 2:
        return s
    try:
        a, b = int(pieces[0]), int(pieces[1])
    except ValueError:
        return s
    if s != f"{a}/{b}":
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(s: str) -> str:
    return s.split("\\text{ ", 1)[0] if "\\text{ " in s else s


def _fix_sqrt(s: str) -> str:
    # "\sqrt3" -> "\sqrt{3}"
    if "\\sqrt" not in s:
        return s
    pieces = s.split("\\sqrt")
    out = pieces[0]
    for piece in pieces[1:]:
        if not piece:
            out += "\\sqrt"
        elif piece[0] != "{":
            out += "\\sqrt{" + piece[0] + "}" + piece[1:]
        else:
            out += "\\sqrt" + piece
    return out


def strip_string(s: str) -> str:
    """Normalise a MATH answer string (spacing, ``\\left``/``\\right``, degrees, dollars, units, percent,
    leading zeros of decimals, ``x =`` prefixes, ``\\frac`` / ``\\sqrt`` shorthands, ``a/b``)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 5" / "k=5" -> "5"
        s = sides[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def is_equiv(a: str | None, b: str | None) -> bool:
    """Whether two MATH answers are equal after :func:`strip_string` (None == None, as officially)."""
    if a is None and b is None:
        return True
    if a is None or b is None:
        return False
    try:
        return strip_string(a) == strip_string(b)
    except Exception:  # normalisation is string surgery; never let it raise into a reward
        return a == b
