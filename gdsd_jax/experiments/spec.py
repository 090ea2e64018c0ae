"""Experiment files and the runs they plan.

An experiment file (``configs/experiments/*.yaml``) names the tasks (a base run config each), the methods
(an ``objective`` section and dotted overrides each, plus a hyper-parameter grid), a rollout budget shared
by every method, the seeds, and optional studies (variants of one method). :func:`parse_experiment` checks
it into an :class:`Experiment`; :func:`selection_runs`, :func:`main_runs` and :func:`study_runs` plan the
:class:`RunSpec` of each phase (:mod:`gdsd_jax.experiments.runner` runs them).

Runs live in ``OUT/runs/TASK/METHOD/TAG-HASH``; the hash covers the run's whole resolved config (output
directory and warm-start path excluded), so a run shared by two phases (e.g. the seed-0 selection run at
the main budget) executes once (:func:`dedupe`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

from gdsd_jax.config_io import (
    ConfigError,
    parse_override,
    read_yaml,
    resolve_config_path,
)

SELECTION_SPLIT = "validation"   # hyper-parameters are chosen here ...

REPORT_SPLIT = "test"            # ... and the chosen points reported here, never both on one split


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    config: str                       # base run config (YAML)
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    objective: dict                   # replaces the base config's ``objective`` section
    overrides: tuple[str, ...] = ()
    grid: dict = dataclasses.field(default_factory=dict)          # dotted key -> list of values
    task_overrides: dict = dataclasses.field(default_factory=dict)  # task -> tuple of overrides


@dataclasses.dataclass(frozen=True)
class StudySpec:
    name: str
    method: str
    variants: dict                    # variant -> {"objective": {...}, "overrides": (...)}
    seeds: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    output_dir: str
    tasks: dict                       # name -> TaskSpec
    methods: dict                     # name -> MethodSpec
    seeds: tuple[int, ...]
    budget: dict                      # prompts_per_step, num_generations, total_steps, eval_every
    selection: dict                   # seed, total_steps, eval_every
    studies: dict                     # name -> StudySpec
    common_overrides: tuple[str, ...] = ()
    warm_start_seed: int = 0
    compilation_cache: str | None = None
    estimate: dict = dataclasses.field(default_factory=dict)
    claims: dict = dataclasses.field(default_factory=dict)
    source: str = ""

    def rows_per_step(self) -> int:
        return int(self.budget["prompts_per_step"]) * int(self.budget["num_generations"])


def _req(d: dict, key: str, where: str):
    if key not in d:
        raise ConfigError(f"{where}: missing key {key!r}")
    return d[key]


def _overrides(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of KEY=VALUE strings, got {value!r}")
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{where}: expected KEY=VALUE strings, got {item!r}")
        parse_override(item)  # fails naming the bad item
    return tuple(value)


def _check_keys(d: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(allowed)}")


def _int_list(value, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                      for v in value):
        raise ConfigError(f"{where}: expected a non-empty list of integers, got {value!r}")
    return tuple(value)


def parse_experiment(data: dict, source: str = "") -> Experiment:
    """Validate an experiment mapping (see ``configs/experiments/tiny_baselines.yaml``)."""
    top = {"name", "output_dir", "tasks", "methods", "seeds", "budget", "selection", "studies",
           "common_overrides", "warm_start_seed", "compilation_cache", "estimate", "claims"}
    _check_keys(data, top, "experiment")
    tasks = {}
    for name, t in (_req(data, "tasks", "experiment") or {}).items():
        if not isinstance(t, dict):
            raise ConfigError(f"tasks.{name}: expected a mapping with 'config' (and 'overrides')")
        _check_keys(t, {"config", "overrides"}, f"tasks.{name}")
        tasks[name] = TaskSpec(name, str(resolve_config_path(str(_req(t, "config", f"tasks.{name}")))),
                               _overrides(t.get("overrides"), f"tasks.{name}.overrides"))
    if not tasks:
        raise ConfigError("experiment: 'tasks' is empty")
    methods = {}
    for name, m in (_req(data, "methods", "experiment") or {}).items():
        if not isinstance(m, dict):
            raise ConfigError(f"methods.{name}: expected a mapping with 'objective'")
        _check_keys(m, {"objective", "overrides", "grid", "task_overrides"}, f"methods.{name}")
        obj = _req(m, "objective", f"methods.{name}")
        if not isinstance(obj, dict) or "name" not in obj:
            raise ConfigError(f"methods.{name}.objective: expected a mapping with at least 'name'")
        grid = m.get("grid") or {}
        if not isinstance(grid, dict):
            raise ConfigError(f"methods.{name}.grid: expected a mapping KEY -> list of values")
        for k, vals in grid.items():
            if not isinstance(vals, (list, tuple)) or not vals:
                raise ConfigError(f"methods.{name}.grid.{k}: expected a non-empty list of values, got {vals!r}")
        tover = {}
        for tname, ov in (m.get("task_overrides") or {}).items():
            if tname not in tasks:
                raise ConfigError(f"methods.{name}.task_overrides: unknown task {tname!r}; tasks: {sorted(tasks)}")
            tover[tname] = _overrides(ov, f"methods.{name}.task_overrides.{tname}")
        methods[name] = MethodSpec(name, dict(obj), _overrides(m.get("overrides"), f"methods.{name}.overrides"),
                                   {k: list(v) for k, v in grid.items()}, tover)
    if not methods:
        raise ConfigError("experiment: 'methods' is empty")
    seeds = _int_list(_req(data, "seeds", "experiment"), "seeds")
    budget = dict(_req(data, "budget", "experiment"))
    _check_keys(budget, {"prompts_per_step", "num_generations", "total_steps", "eval_every"}, "budget")
    for k in ("prompts_per_step", "num_generations", "total_steps"):
        v = _req(budget, k, "budget")
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"budget.{k}: expected a positive integer, got {v!r}")
    budget.setdefault("eval_every", 0)
    sel = dict(data.get("selection") or {})
    _check_keys(sel, {"seed", "total_steps", "eval_every"}, "selection")
    sel.setdefault("seed", seeds[0])
    sel.setdefault("total_steps", budget["total_steps"])
    sel.setdefault("eval_every", budget["eval_every"])
    studies = {}
    for name, s in (data.get("studies") or {}).items():
        _check_keys(s, {"method", "variants", "seeds"}, f"studies.{name}")
        meth = _req(s, "method", f"studies.{name}")
        if meth not in methods:
            raise ConfigError(f"studies.{name}.method: unknown method {meth!r}; methods: {sorted(methods)}")
        variants = {}
        for vname, v in (_req(s, "variants", f"studies.{name}") or {}).items():
            _check_keys(v, {"objective", "overrides"}, f"studies.{name}.variants.{vname}")
            variants[vname] = {"objective": dict(v.get("objective") or {}),
                               "overrides": _overrides(v.get("overrides"), f"studies.{name}.variants.{vname}")}
        if not variants:
            raise ConfigError(f"studies.{name}: 'variants' is empty")
        if name in methods:
            raise ConfigError(f"studies.{name}: a study may not share its name with a method")
        studies[name] = StudySpec(name, meth, variants, _int_list(s.get("seeds", list(seeds)), f"studies.{name}.seeds"))
    return Experiment(
        name=str(data.get("name", "experiment")), output_dir=str(data.get("output_dir", "runs/experiment")),
        tasks=tasks, methods=methods, seeds=seeds, budget=budget, selection=sel, studies=studies,
        common_overrides=_overrides(data.get("common_overrides"), "common_overrides"),
        warm_start_seed=int(data.get("warm_start_seed", 0)), compilation_cache=data.get("compilation_cache"),
        estimate=dict(data.get("estimate") or {}), claims=dict(data.get("claims") or {}), source=source)


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment file (a path, or that of one shipped with the package: see ``resolve_config_path``)."""
    return parse_experiment(read_yaml(resolve_config_path(path)), str(path))


def grid_points(grid: dict) -> list[dict]:
    """Cartesian product of a grid ``{key: [values]}`` in file order: a list of ``{key: value}``."""
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def point_tag(point: dict) -> str:
    """``{"optim.lr": 1e-4, "objective.psi": 1.0}`` -> ``"lr=0.0001,psi=1"``."""
    return ",".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in point.items()) or "default"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of the experiment."""
    task: str
    method: str            # a method name, or a study name for study runs
    variant: str | None    # study variant
    point: tuple           # ((key, value), ...) of the method's grid
    seed: int
    total_steps: int
    eval_every: int
    phases: tuple[str, ...]
    config: str            # the base run config path
    overrides: tuple[str, ...]

    @property
    def point_dict(self) -> dict:
        return dict(self.point)

    @property
    def group(self) -> str:
        """``task/method`` (or ``task/study:variant``): what ``--only`` matches and what aggregates over seeds."""
        return f"{self.task}/{self.method}" + (f":{self.variant}" if self.variant else "")

    def key(self) -> str:
        """Hash of the base config's contents and every override except the output directory."""
        base = read_yaml(self.config)
        # The warm-start path differs between a dry run and a real one, not the run itself.
        kept = [o for o in self.overrides
                if not o.startswith(("output_dir=", "model.checkpoint=", "warm_start.mode="))]
        blob = json.dumps({"base": base, "overrides": kept}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    def run_dir(self, out: Path) -> Path:
        name = self.method + (f"-{self.variant}" if self.variant else "")
        tag = f"{point_tag(self.point_dict)},steps={self.total_steps},seed={self.seed}-{self.key()}"
        return Path(out) / "runs" / self.task / name / tag.replace("/", "_")


def _objective_override(obj: dict) -> str:
    return "objective=" + json.dumps(obj, sort_keys=True)


def _point_overrides(point: dict) -> list[str]:
    out = []
    for k, v in point.items():
        out.append(f"{k}={json.dumps(v) if not isinstance(v, str) else v}")
    return out


def make_run(exp: Experiment, task: str, method: str, point: dict, seed: int, *, total_steps: int,
             eval_every: int, phase: str, variant: str | None = None, study: str | None = None,
             warm_start: str | Path | None = None) -> RunSpec:
    """The run of ``method`` (or of ``study``'s ``variant``) at grid ``point`` and ``seed``.

    Override order (later wins): task overrides, the common overrides, the method's objective section
    (replacing the base config's) and overrides, its per-task overrides, the variant's, the grid point, then
    the budget (P, G, every rollout trained on, steps, eval cadence, one micro-batch per step), the eval split
    (validation for ``phase="select"``, test otherwise; no step-0 evaluation: the shared warm start is
    measured once) and the seed.
    """
    t = exp.tasks[task]
    m = exp.methods[method]
    obj = dict(m.objective)
    extra: list[str] = []
    if variant is not None:
        v = exp.studies[study].variants[variant]
        obj.update(v["objective"])
        extra = list(v["overrides"])
    ov = [*t.overrides, *exp.common_overrides, _objective_override(obj), *m.overrides,
          *m.task_overrides.get(task, ()), *extra, *_point_overrides(point)]
    p, g = int(exp.budget["prompts_per_step"]), int(exp.budget["num_generations"])
    # The budget is P x G rollouts per step for every method: no dynamic sampling (it would roll out more).
    split = SELECTION_SPLIT if phase == "select" else REPORT_SPLIT
    ov += [f"rl.prompts_per_step={p}", f"rl.num_generations={g}", f"rl.micro_batch_size={p * g}",
           "rl.rollout_prompts_per_step=null",
           f"rl.total_steps={total_steps}", f"eval.every={eval_every}", f"eval.split={split}",
           "eval.initial=false", f"rl.seed={seed}"]
    if warm_start is not None:
        ov += [f"model.checkpoint={warm_start}", "warm_start.mode=none"]
    return RunSpec(task, study or method, variant, tuple(point.items()), seed, total_steps, eval_every, (phase,),
                   t.config, tuple(ov))


def matches(group: str, only: Sequence[str] | None) -> bool:
    """Whether the run group ``TASK/METHOD[:VARIANT]`` is selected by the ``--only`` patterns (``TASK`` alone
    means ``TASK/*``; no patterns select everything)."""
    if not only:
        return True
    base = group.split(":")[0]
    for pat in only:
        pat = pat if "/" in pat else pat + "/*"
        if fnmatch.fnmatch(base, pat) or fnmatch.fnmatch(group, pat):
            return True
    return False


def selection_runs(exp: Experiment, warm_starts: dict | None = None, only=None) -> list[RunSpec]:
    """Every grid point of every (task, method), one seed, the selection budget."""
    runs = []
    for task in exp.tasks:
        for method, m in exp.methods.items():
            if not matches(f"{task}/{method}", only):
                continue
            for point in grid_points(m.grid):
                runs.append(make_run(exp, task, method, point, int(exp.selection["seed"]),
                                     total_steps=int(exp.selection["total_steps"]),
                                     eval_every=int(exp.selection["eval_every"]), phase="select",
                                     warm_start=(warm_starts or {}).get(task)))
    return runs


def main_runs(exp: Experiment, chosen: dict, warm_starts: dict | None = None, only=None) -> list[RunSpec]:
    """Every (task, method) at its chosen point (``chosen[(task, method)]``), for every seed."""
    runs = []
    for task in exp.tasks:
        for method in exp.methods:
            if (task, method) not in chosen or not matches(f"{task}/{method}", only):
                continue
            for seed in exp.seeds:
                runs.append(make_run(exp, task, method, chosen[(task, method)], seed,
                                     total_steps=int(exp.budget["total_steps"]),
                                     eval_every=int(exp.budget["eval_every"]), phase="main",
                                     warm_start=(warm_starts or {}).get(task)))
    return runs


def study_runs(exp: Experiment, chosen: dict, warm_starts: dict | None = None, only=None) -> list[RunSpec]:
    runs = []
    for sname, s in exp.studies.items():
        for task in exp.tasks:
            if (task, s.method) not in chosen or not (matches(f"{task}/{sname}", only)):
                continue
            for variant in s.variants:
                for seed in s.seeds:
                    runs.append(make_run(exp, task, s.method, chosen[(task, s.method)], seed,
                                         total_steps=int(exp.budget["total_steps"]),
                                         eval_every=int(exp.budget["eval_every"]), phase="study",
                                         variant=variant, study=sname, warm_start=(warm_starts or {}).get(task)))
    return runs


def dedupe(runs: Sequence[RunSpec], out: Path) -> list[RunSpec]:
    """One spec per run directory (phases merged), in first-seen order."""
    seen: dict[Path, RunSpec] = {}
    for r in runs:
        d = r.run_dir(out)
        if d in seen:
            seen[d] = dataclasses.replace(seen[d], phases=tuple(dict.fromkeys(seen[d].phases + r.phases)))
        else:
            seen[d] = r
    return list(seen.values())


def warm_start_eval_path(out: Path, task: str) -> Path:
    return Path(out) / "warm_starts" / f"{task}.eval.json"
