"""Splitting a test into what the untrusted program computes and what the trusted supervisor judges.

A test such as ``assert f(3) == [1, 2]`` is split into a *probe* ``f(3)``, evaluated in the program's
process, and a *judgement* ``_p0 == [1, 2]``, evaluated by the sandbox supervisor on the probe's value sent
back as plain data. The program's process therefore never holds the expected values, and no verdict it
writes can count: it can only report values, which the supervisor compares.

How a top-level ``assert`` is split: walking down from its condition, comparisons, boolean and arithmetic
operators, conditional expressions, displays (``[..]``, ``(..)``, ``{..}``) and calls of trusted functions
(:data:`TRUSTED_NAMES`: safe builtins and ``math``) stay in the judgement; any other sub-expression that
uses a name the program or the test defines (``f(3)``, ``s.items``, ``f(3)[0]``, a comprehension or lambda
over such names) becomes a probe, as a whole. A sub-expression with only trusted names and literals stays in
the judgement. Other top-level statements of the test (``s = Solution()``) run in the program's process, in
order; an ``assert`` nested inside another statement (a ``for`` loop) is then decided there, as under the
official rule, and a name such a statement binds (``expected = [1, 2]``) is a probe: its value comes from
the program's process too.

Comparison modes of the judgement:

* ``"strict"``: ``==``, ``!=``, ``in`` and ``not in`` compare type and value (deeply: ``2.0 == 2``,
  ``True == 1`` and ``(1, 2) == [1, 2]`` are false);
* ``"python"``: Python's own operators, on the probe values as plain data (the official assert rule for
  every test whose values are built-in data).

A probe value must be built-in data (``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``
and ``list``/``tuple``/``set``/``frozenset``/``dict`` of them). A value of a subclass of one of these
(``collections.Counter``, ``OrderedDict``, ``defaultdict``, NumPy's ``float64``, an ``int`` subclass
defining ``__eq__``) fails in ``"strict"`` mode and is compared by its built-in content in ``"python"`` mode;
any other object (a class of the program, a NumPy integer or array) fails in both. No method of the
program's objects (``__eq__``, ``__hash__``) ever runs in the judgement.
"""

from __future__ import annotations

import ast
import dataclasses

COMPARISONS = ("strict", "python")

TRUSTED_NAMES = frozenset({
    "abs", "all", "any", "bool", "bytes", "chr", "complex", "dict", "divmod", "enumerate", "filter", "float",
    "frozenset", "hash", "int", "isinstance", "len", "list", "map", "max", "min", "ord", "pow", "range",
    "repr", "reversed", "round", "set", "sorted", "str", "sum", "tuple", "type", "zip", "True", "False", "None",
    "math",
})

# Names a judgement uses besides TRUSTED_NAMES: probe values are PROBE_PREFIX + index; strict comparisons
# call the supervisor's functions STRICT_EQ and STRICT_IN. The host sends these to the supervisor with the job.
PROBE_PREFIX, STRICT_EQ, STRICT_IN = "_p", "_eq", "_in"
_RECURSE = (ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.IfExp, ast.Tuple, ast.List, ast.Set, ast.Dict,
            ast.Starred)


@dataclasses.dataclass(frozen=True)
class Step:
    """One top-level statement of a test: ``run`` (source run in the program's process) or a check
    (``probes``: expression sources evaluated there; ``judgement``: an expression over ``_p0, _p1, ...``
    evaluated by the supervisor)."""

    run: str | None = None
    probes: tuple[str, ...] = ()
    judgement: str | None = None


def _free_names(node: ast.AST) -> set[str]:
    """Names ``node`` reads that it does not bind itself (comprehension targets and lambda arguments)."""
    read, bound = set(), set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            (bound if isinstance(sub.ctx, ast.Store) else read).add(sub.id)
        elif isinstance(sub, ast.arg):
            bound.add(sub.arg)
    return read - bound


def _untrusted(node: ast.AST) -> bool:
    return bool(_free_names(node) - TRUSTED_NAMES)


class _Splitter(ast.NodeTransformer):
    """Replaces each maximal untrusted sub-expression of a judgement by a probe name."""

    def __init__(self):
        self.probes: list[str] = []

    def _probe(self, node: ast.expr) -> ast.Name:
        if isinstance(node, ast.GeneratorExp):  # a generator is not data: send its items
            node = ast.ListComp(elt=node.elt, generators=node.generators)
        self.probes.append(ast.unparse(node))
        return ast.Name(id=f"{PROBE_PREFIX}{len(self.probes) - 1}", ctx=ast.Load())

    def visit(self, node):
        if not isinstance(node, ast.expr) or not _untrusted(node):
            return node
        if isinstance(node, _RECURSE):
            return self.generic_visit(node)
        if isinstance(node, ast.Call) and not _untrusted(node.func):
            node.args = [self.visit(a) for a in node.args]
            node.keywords = [ast.keyword(arg=k.arg, value=self.visit(k.value)) for k in node.keywords]
            return node
        return self._probe(node)


class _Strict(ast.NodeTransformer):
    """``a == b`` -> ``_eq(a, b)``, ``a in b`` -> ``_in(a, b)`` (negations likewise); chains split with ``and``
    (a probe then appears twice in the judgement; it is a value, evaluated once by the program)."""

    def visit_Compare(self, node: ast.Compare):
        self.generic_visit(node)
        pairs = []
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            if isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)):
                fn = STRICT_EQ if isinstance(op, (ast.Eq, ast.NotEq)) else STRICT_IN
                test = ast.Call(func=ast.Name(id=fn, ctx=ast.Load()), args=[left, right], keywords=[])
                if isinstance(op, (ast.NotEq, ast.NotIn)):
                    test = ast.UnaryOp(op=ast.Not(), operand=test)
            else:
                test = ast.Compare(left=left, ops=[op], comparators=[right])
            pairs.append(test)
            left = right
        return pairs[0] if len(pairs) == 1 else ast.BoolOp(op=ast.And(), values=pairs)


def split_test(test: str, comparison: str = "strict") -> list[Step]:
    """The steps of ``test`` (Python source). Raises ``SyntaxError`` if it does not parse."""
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison must be one of {COMPARISONS}, got {comparison!r}")
    steps = []
    for stmt in ast.parse(test).body:
        if not isinstance(stmt, ast.Assert):
            steps.append(Step(run=ast.unparse(stmt)))
            continue
        splitter = _Splitter()
        judgement = splitter.visit(stmt.test)
        if comparison == "strict":
            judgement = _Strict().visit(judgement)
        judgement = ast.fix_missing_locations(ast.Expression(judgement))
        steps.append(Step(probes=tuple(splitter.probes), judgement=ast.unparse(judgement.body)))
    return steps

