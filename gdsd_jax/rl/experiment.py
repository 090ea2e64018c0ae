"""Multi-run experiments: GDSD against the baselines over tasks, learning rates and seeds, then aggregation.

An experiment file (``configs/experiments/*.yaml``) names the tasks (a base run config each), the methods
(an ``objective`` section and dotted overrides each, plus a hyper-parameter grid), a rollout budget shared
by every method, the seeds, and optional studies (variants of one method). :func:`run_experiment` then:

1. **Shared warm start.** For every task, the initial weights are built once (the task config's model at
   ``warm_start_seed``, then its SFT warm start if ``warm_start.mode: sft``, whose early stop looks at the
   validation split) and saved under ``OUT/warm_starts/TASK``; every run of the task starts from that
   checkpoint (``model.checkpoint``), so methods and seeds differ only in the RL phase. The warm start is
   evaluated once on the validation and the test split (``OUT/warm_starts/TASK.eval.json``); the runs skip
   their own step-0 evaluation (``eval.initial=false``).
2. **Selection.** Every grid point of every method runs once (seed ``selection.seed``, ``selection``
   budget), evaluated on the **validation** split; the point with the best final greedy validation reward
   is chosen (ties: the higher mean rollout reward over the last 10 steps, then the earlier grid point).
3. **Main.** Every method at its chosen point, for every seed, evaluated on the **test** split.
4. **Studies.** Each variant of a study: the study's method at its chosen point plus the variant's
   overrides, for every seed (test split).
5. **Aggregation.** ``OUT/results.md`` (per task: final test reward mean, sample std and 95% t interval
   over seeds, GDSD's paired difference to every baseline with an exact bootstrap interval; the selection
   grid; a check of the paper's claims) and PNG curves next to it (mean and spread over seeds).

The trainer logs the greedy reward of its eval split under ``test_reward`` whichever split that is: in a
selection run that key holds the validation reward.

Runs live in ``OUT/runs/TASK/METHOD/TAG-HASH``; the hash covers the run's whole resolved config (output
directory and warm-start path excluded), so a run shared by two phases (e.g. the seed-0 selection run at
the main budget) executes once, and a finished run (``done.json``) is skipped: an interrupted experiment
resumes where it stopped. A run interrupted mid-way restarts from its last checkpoint (``--resume``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
import yaml
from tqdm.auto import tqdm

from gdsd_jax.checkpoint.params_io import is_params_checkpoint, restore_params, save_params
from gdsd_jax.config_io import (
    ConfigError,
    apply_overrides,
    build,
    load_config,
    parse_override,
    read_yaml,
    resolve_config_path,
    to_dict,
)
from gdsd_jax.rl.run import run_train
from gdsd_jax.rl.stats import mean_ci, paired_bootstrap_ci, seed_stats
from gdsd_jax.sft.run import warm_start
from gdsd_jax.training.config import TrainConfig
from gdsd_jax.training.evaluate import evaluate
from gdsd_jax.training.metrics import parse_records
from gdsd_jax.training.setup import build_mesh, build_model, build_task_and_adapter, eval_examples

TAIL = 10  # steps averaged for "final rollout reward" and the selection tie-break
SELECTION_SPLIT = "validation"   # hyper-parameters are chosen here ...
REPORT_SPLIT = "test"            # ... and the chosen points reported here, never both on one split
REFERENCE_METHOD = "gdsd"        # the paired differences are this method minus each other one


# ---- experiment file ----------------------------------------------------------------------------

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


# ---- run specs ----------------------------------------------------------------------------------

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


def _matches(group: str, only: Sequence[str] | None) -> bool:
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
            if not _matches(f"{task}/{method}", only):
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
            if (task, method) not in chosen or not _matches(f"{task}/{method}", only):
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
            if (task, s.method) not in chosen or not (_matches(f"{task}/{sname}", only)):
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


# ---- metrics of finished runs -------------------------------------------------------------------

def read_records(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    return parse_records(p.read_text(), p)


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "done.json").is_file()


def series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [N], values [N]) of the records carrying a finite number under ``key``."""
    pts = [(int(r["step"]), float(r[key])) for r in records
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0, int), np.zeros(0)
    s, v = zip(*sorted(pts))
    return np.asarray(s), np.asarray(v)


def final_test_reward(records: Sequence[dict], total_steps: int) -> float | None:
    """The greedy test reward logged at ``total_steps`` (the final evaluation), or None."""
    s, v = series(records, "test_reward")
    hit = v[s == total_steps]
    return float(hit[-1]) if len(hit) else None


def tail_reward(records: Sequence[dict], n: int = TAIL) -> float | None:
    """Mean rollout reward over the last ``n`` RL steps."""
    _, v = series(records, "reward_mean")
    return float(np.mean(v[-n:])) if len(v) else None


def select_point(candidates: Sequence[tuple[dict, list[dict], int]]) -> tuple[dict, list[dict]] | None:
    """Pick the best grid point from ``(point, records, total_steps)`` of finished selection runs.

    Best = the highest final greedy reward on the run's eval split (validation for selection runs); ties go to the higher mean rollout reward over the last
    ``TAIL`` steps, then to the earlier candidate. Returns ``(point, table)`` where ``table`` lists every
    candidate's numbers (``chosen`` marks the pick), or None if no candidate has a final test reward.
    """
    table = []
    best, best_key = None, None
    for i, (point, records, total) in enumerate(candidates):
        ftr = final_test_reward(records, total)
        tail = tail_reward(records)
        table.append({"point": point, "final_test_reward": ftr, "tail_reward": tail, "chosen": False})
        if ftr is None:
            continue
        key = (ftr, -math.inf if tail is None else tail, -i)
        if best_key is None or key > best_key:
            best, best_key = i, key
    if best is None:
        return None
    table[best]["chosen"] = True
    return dict(candidates[best][0]), table


def aggregate_curves(runs_records: Sequence[Sequence[dict]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and sample std over seeds of ``key`` at the steps every seed logged: (steps [S], mean [S], std [S])."""
    per = [dict(zip(*series(r, key))) for r in runs_records]
    per = [p for p in per if p]
    if not per:
        return np.zeros(0, int), np.zeros(0), np.zeros(0)
    common = sorted(set.intersection(*(set(p) for p in per)))
    vals = np.asarray([[p[s] for s in common] for p in per], dtype=np.float64)   # [seeds, S]
    std = vals.std(axis=0, ddof=1) if len(per) > 1 else np.zeros(len(common))
    return np.asarray(common), vals.mean(axis=0), std


def smooth(v: np.ndarray, w: int) -> np.ndarray:
    """Trailing moving average over ``w`` points (shorter windows at the start)."""
    v = np.asarray(v, dtype=np.float64)
    if w <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - w, 0)
    return (c[idx] - c[lo]) / (idx - lo)


# ---- execution ----------------------------------------------------------------------------------

def write_run_config(spec: RunSpec, out: Path) -> Path:
    """Resolve the run's config (validated) and write it to ``RUN_DIR/run_config.yaml``."""
    d = spec.run_dir(out)
    tree = apply_overrides(read_yaml(spec.config), [*spec.overrides, f"output_dir={d}"])
    cfg = build(TrainConfig, tree).validate()
    d.mkdir(parents=True, exist_ok=True)
    path = d / "run_config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def _finish(spec: RunSpec, out: Path, wall: float, keep_checkpoints: bool) -> None:
    d = spec.run_dir(out)
    records = read_records(d)
    if final_test_reward(records, spec.total_steps) is None:
        raise RuntimeError(f"run {d} ended without a final evaluation at step {spec.total_steps}")
    info = {"task": spec.task, "method": spec.method, "variant": spec.variant, "point": spec.point_dict,
            "seed": spec.seed, "total_steps": spec.total_steps, "wall_time_s": wall,
            "final_test_reward": final_test_reward(records, spec.total_steps)}
    if not keep_checkpoints and (d / "checkpoints").exists():
        shutil.rmtree(d / "checkpoints", ignore_errors=True)   # the results need metrics only
    (d / "done.json").write_text(json.dumps(info, indent=2) + "\n")


def run_inprocess(config_path: Path, progress: bool) -> None:
    cfg = load_config(TrainConfig, config_path)
    run_train(cfg, resume=True, progress=progress)


def run_subprocess(config_path: Path, env: dict | None = None) -> None:
    """``gdsd-jax train --config RUN_DIR/run_config.yaml --resume`` in a child process (log: RUN_DIR/log.txt)."""
    log = config_path.parent / "log.txt"
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "gdsd_jax.cli", "train", "--config", str(config_path),
                               "--resume", "--no-progress"], stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})})
    if proc.returncode:
        raise RuntimeError(f"run {config_path.parent} failed with exit code {proc.returncode}; see {log}")


def execute(specs: Sequence[RunSpec], out: Path, *, jobs: int = 1, progress: bool = True,
            keep_checkpoints: bool = False, env: dict | None = None,
            runner: Callable[[Path], None] | None = None, say: Callable[[str], None] = print) -> list[str]:
    """Run every unfinished spec; returns the error messages of failed runs (the others still run)."""
    todo = [s for s in specs if not is_finished(s.run_dir(out))]
    if len(specs) > len(todo):
        say(f"{len(specs) - len(todo)} of {len(specs)} runs already finished; skipping them")
    errors: list[str] = []
    if not todo:
        return errors

    def one(spec: RunSpec) -> None:
        path = write_run_config(spec, out)
        t0 = time.perf_counter()
        if runner is not None:
            runner(path)
        elif jobs > 1:
            run_subprocess(path, env)
        else:
            run_inprocess(path, progress=False)
        _finish(spec, out, time.perf_counter() - t0, keep_checkpoints)

    bar = tqdm(total=len(todo), desc="runs", disable=not progress)
    if jobs <= 1:
        for spec in todo:
            bar.set_postfix_str(spec.group)
            try:
                one(spec)
            except Exception as e:  # noqa: BLE001 - one failed run must not stop the experiment
                errors.append(f"{spec.run_dir(out)}: {type(e).__name__}: {e}")
                say(f"run failed: {errors[-1]}")
            bar.update(1)
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futs = {pool.submit(one, s): s for s in todo}
            for fut in concurrent.futures.as_completed(futs):
                try:
                    fut.result()
                except Exception as e:  # noqa: BLE001
                    errors.append(f"{futs[fut].run_dir(out)}: {type(e).__name__}: {e}")
                    say(f"run failed: {errors[-1]}")
                bar.update(1)
    bar.close()
    return errors


def warm_start_eval_path(out: Path, task: str) -> Path:
    return Path(out) / "warm_starts" / f"{task}.eval.json"


def prepare_warm_starts(exp: Experiment, out: Path, tasks: Sequence[str], say=print,
                        progress: bool = True) -> dict[str, Path]:
    """One initial checkpoint per task: the task config's model at ``warm_start_seed`` (+ its SFT warm start,
    stopped on the validation split), and its greedy reward on the validation and the test split, measured
    once for every run of the task (``warm_start_eval_path``)."""
    paths = {}
    for task in tasks:
        t = exp.tasks[task]
        path = Path(out) / "warm_starts" / task
        paths[task] = path
        evals = warm_start_eval_path(out, task)
        if is_params_checkpoint(path) and evals.is_file():
            continue
        cfg = load_config(TrainConfig, t.config, [*t.overrides, *exp.common_overrides,
                                                  f"rl.seed={exp.warm_start_seed}",
                                                  f"eval.split={SELECTION_SPLIT}"]).validate()
        mesh = build_mesh(cfg)
        if is_params_checkpoint(path):
            params, model_cfg = restore_params(path, mesh=mesh)
        else:
            model_cfg, params = build_model(cfg, mesh)
            if cfg.warm_start.mode == "sft" and not cfg.model.checkpoint:
                say(f"{task}: warm start (SFT, cached under {cfg.warm_start.cache_dir})")
                model_cfg, params = warm_start(cfg, mesh, model_cfg, params, progress=progress)
            save_params(path, params, model_cfg)
        task_obj, adapter, _ = build_task_and_adapter(cfg, model_cfg)
        rewards = {}
        for split in (SELECTION_SPLIT, REPORT_SPLIT):
            res = evaluate(params, model_cfg, adapter, eval_examples(task_obj, cfg, split),
                           cfg.eval_sampling_config(), mesh, batch_size=cfg.eval.batch_size)
            rewards[split] = {"reward": res.mean_reward, "solved": res.accuracy}
            say(f"{task}: warm start {split} reward {res.mean_reward:.3f} (solved {res.accuracy:.3f})")
        evals.write_text(json.dumps(rewards, indent=2) + "\n")
    return paths


def warm_start_reward(out: Path, task: str, split: str = REPORT_SPLIT) -> float | None:
    """The shared warm start's greedy reward on ``split`` (None before it was measured)."""
    p = warm_start_eval_path(out, task)
    return float(json.loads(p.read_text())[split]["reward"]) if p.is_file() else None


# ---- runtime estimate ---------------------------------------------------------------------------

def estimate_seconds(exp: Experiment, spec: RunSpec) -> float:
    """Per-run estimate from the experiment's ``estimate`` section (measured on one machine):
    ``overhead_s + total_steps * step_s[task][method] * (1 + extra_iteration_share * (mu - 1)) +
    evals * eval_s[task]``, evals = the intermediate and the final one (no step-0 evaluation)."""
    e = exp.estimate
    step = e.get("step_s", {}).get(spec.task, {})
    base_method = exp.studies[spec.method].method if spec.method in exp.studies else spec.method
    per_step = float(step.get(base_method, step.get("default", 1.0)))
    mu = 1
    for o in spec.overrides:
        k, v = parse_override(o)
        if k == ["rl", "num_iterations"]:
            mu = int(v)
    per_step *= 1.0 + float(e.get("extra_iteration_share", 0.5)) * (mu - 1)
    n_evals = 1 + (spec.total_steps // spec.eval_every - (spec.total_steps % spec.eval_every == 0)
                   if spec.eval_every else 0)
    eval_s = float(e.get("eval_s", {}).get(spec.task, 5.0))
    return float(e.get("overhead_s", 20.0)) + spec.total_steps * per_step + n_evals * eval_s


# ---- aggregation --------------------------------------------------------------------------------

def _done(d: Path) -> dict | None:
    p = d / "done.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _pm(mean: float, std: float, n: int, digits: int = 3) -> str:
    if n == 0 or not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" + (f" (n={n})" if n else "")


def with_initial(records: Sequence[dict], initial: float | None) -> list[dict]:
    """``records`` plus the shared warm start's reward as the step-0 evaluation (runs skip their own)."""
    if initial is None or any(r.get("step") == 0 and "test_reward" in r for r in records):
        return list(records)
    return [{"step": 0, "test_reward": initial}, *records]


def _group_stats(specs: Sequence[RunSpec], out: Path, initial: float | None = None) -> dict:
    """Numbers of one group of runs (the seeds of one task/method[/variant]); ``initial`` is the shared warm
    start's test reward, the curves' step 0."""
    finished = [s for s in specs if is_finished(s.run_dir(out))]
    recs = [with_initial(read_records(s.run_dir(out)), initial) for s in finished]
    done = [_done(s.run_dir(out)) for s in finished]
    total = specs[0].total_steps
    finals = [final_test_reward(r, total) for r in recs]
    peaks = [float(series(r, "test_reward")[1].max()) if len(series(r, "test_reward")[1]) else None for r in recs]
    tails = [tail_reward(r) for r in recs]
    walls = [d["wall_time_s"] for d in done]
    ts, tm, tsd = aggregate_curves(recs, "test_reward")
    rs, rm, rsd = aggregate_curves(recs, "reward_mean")
    peak_roll = [float(smooth(series(r, "reward_mean")[1], TAIL).max()) if len(series(r, "reward_mean")[1])
                 else None for r in recs]
    return {"n": len(recs), "of": len(specs), "records": recs, "final": seed_stats(finals),
            "final_ci": mean_ci(finals), "final_by_seed": {s.seed: f for s, f in zip(finished, finals)},
            "peak": seed_stats(peaks), "tail": seed_stats(tails),
            "wall": seed_stats(walls), "wall_total": float(sum(walls)), "peak_rollout": seed_stats(peak_roll),
            "test_curve": (ts, tm, tsd), "rollout_curve": (rs, rm, rsd),
            "mean_curve_peak_drop": float(tm.max() - tm[-1]) if len(tm) else math.nan}


def plot_groups(groups: dict[str, dict], path: Path, title: str, extra_key: str | None = None) -> Path:
    """One PNG: rollout reward (smoothed per seed) and greedy test reward vs step, mean ± std over seeds."""
    import matplotlib  # lazy: heavy, and only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 3 if extra_key else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4))
    for i, (label, g) in enumerate(groups.items()):
        c = f"C{i % 10}"
        sm = [dict(zip(series(r, "reward_mean")[0], smooth(series(r, "reward_mean")[1], 5))) for r in g["records"]]
        sm = [s for s in sm if s]
        if sm:
            common = sorted(set.intersection(*(set(s) for s in sm)))
            vals = np.asarray([[s[k] for k in common] for s in sm])
            m = vals.mean(0)
            sd = vals.std(0, ddof=1) if len(sm) > 1 else np.zeros_like(m)
            axes[0].plot(common, m, color=c, label=f"{label} (n={g['n']})")
            axes[0].fill_between(common, m - sd, m + sd, color=c, alpha=0.15)
        ts, tm, tsd = g["test_curve"]
        if len(ts):
            axes[1].plot(ts, tm, "o-", ms=3, color=c, label=label)
            axes[1].fill_between(ts, tm - tsd, tm + tsd, color=c, alpha=0.15)
        if extra_key:
            xs, xm, xsd = aggregate_curves(g["records"], extra_key)
            if len(xs):
                axes[2].plot(xs, xm, color=c, label=label)
                axes[2].fill_between(xs, xm - xsd, xm + xsd, color=c, alpha=0.15)
    axes[0].set_title("rollout reward (T=1, moving average of 5 steps)")
    axes[1].set_title("greedy test reward")
    if extra_key:
        axes[2].set_title(extra_key)
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("reward (mean ± std over seeds)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _claims(exp: Experiment, stats: dict, tasks: Sequence[str]) -> list[str]:
    """Plain statements of the paper's claims (the GDSD paper, §5.2) against the measured numbers."""
    tol = float(exp.claims.get("tolerance", 0.03))
    collapse = float(exp.claims.get("collapse_fraction", 0.5))
    lines = [f"Criteria: *stable* = the mean-over-seeds test-reward curve ends within {tol} of its maximum; "
             f"*drift after the peak* = it ends more than {tol} below its maximum; *collapse* = the final "
             f"rollout reward (last {TAIL} steps) is below {collapse:.0%} of the peak of its {TAIL}-step moving "
             f"average, averaged over seeds.", ""]

    def drop(task, m):
        g = stats.get((task, m))
        return None if g is None or not g["n"] else g["mean_curve_peak_drop"]

    for task in tasks:
        for m in ("gdsd", "gdsd_tlc"):
            d = drop(task, m)
            if d is not None:
                verdict = "held" if d <= tol else "did not hold"
                lines.append(f"- **{task}: {m} stable** — {verdict}: the mean test-reward curve ends {d:.3f} below "
                             f"its maximum.")
        d = drop(task, "espo")
        if d is not None:
            verdict = "held" if d > tol else "did not hold"
            lines.append(f"- **{task}: ESPO drifts after its peak** — {verdict}: the mean test-reward curve ends "
                         f"{d:.3f} below its maximum.")
        g = stats.get((task, "spg"))
        if g is not None and g["n"]:
            tail, peak = g["tail"][0], g["peak_rollout"][0]
            ratio = tail / peak if peak else math.nan
            collapsed = ratio < collapse
            expect = "(the paper: collapse on Countdown)" if task == "countdown" else "(the paper reports no collapse here)"
            lines.append(f"- **{task}: SPG collapse** {expect} — {'collapsed' if collapsed else 'no collapse'}: "
                         f"final rollout reward {tail:.3f} vs moving-average peak {peak:.3f} (ratio {ratio:.2f}).")
        ranked = sorted(((g["final"][0], m) for (t, m), g in stats.items() if t == task and g["n"]),
                        reverse=True)
        if ranked:
            order = ", ".join(f"{m} {v:.3f}" for v, m in ranked)
            best_gdsd = ranked[0][1].startswith("gdsd")
            lines.append(f"- **{task}: a GDSD variant has the best final test reward** — "
                         f"{'held' if best_gdsd else 'did not hold'}: {order}.")
    return lines


def paired_difference(ref_by_seed: dict, other_by_seed: dict) -> tuple[float, float, float, int] | None:
    """(mean of ref - other, bootstrap lower, upper, n) over the seeds both finished (None if there are none)."""
    seeds = sorted(k for k in ref_by_seed if ref_by_seed[k] is not None and other_by_seed.get(k) is not None)
    if not seeds:
        return None
    mean, lo, hi = paired_bootstrap_ci([ref_by_seed[k] for k in seeds], [other_by_seed[k] for k in seeds])
    return mean, lo, hi, len(seeds)


def _ci(lo: float, hi: float) -> str:
    return "–" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{lo:.3f}, {hi:.3f}]"


def _diff(d: tuple[float, float, float, int] | None) -> str:
    return "–" if d is None else f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] (n={d[3]})"


def write_results(exp: Experiment, out: Path, chosen: dict, selection: dict, only=None,
                  elapsed: float | None = None, warm_starts: dict | None = None,
                  results_dir: str | Path | None = None) -> Path:
    """``results.md``, ``selection.json`` and the PNGs next to them (in ``results_dir``, default ``out``),
    from the finished runs under ``out``."""
    out = Path(out)
    res_dir = Path(results_dir) if results_dir is not None else out
    res_dir.mkdir(parents=True, exist_ok=True)
    tasks = list(exp.tasks)
    lines = [f"# Results: {exp.name}", "",
             f"Generated by `gdsd-jax experiment {exp.source}` from the runs under `{out}`.", "",
             "## Setup", "",
             f"- Rollout budget, identical for every method: {exp.budget['total_steps']} RL steps x "
             f"{exp.budget['prompts_per_step']} prompts x {exp.budget['num_generations']} completions "
             f"({exp.rows_per_step()} rollouts per step), greedy {REPORT_SPLIT} evaluation every "
             f"{exp.budget['eval_every'] or 'end'} steps; seeds {list(exp.seeds)}.",
             f"- Hyper-parameter selection on the {SELECTION_SPLIT} split: one run per grid point at seed "
             f"{exp.selection['seed']} for {exp.selection['total_steps']} steps; the best final greedy "
             f"{SELECTION_SPLIT} reward wins (ties: the higher rollout reward over the last {TAIL} steps). The "
             f"{REPORT_SPLIT} split is used only for the chosen points.",
             "- Every run of a task starts from the same warm start (one SFT checkpoint per task), evaluated "
             "once; the runs skip their own step-0 evaluation.",
             f"- Final test reward: mean ± sample std over seeds, and the 95% Student-t interval of the mean. "
             f"{REFERENCE_METHOD} − method: the mean paired difference over the seeds both ran, with the 95% "
             f"percentile interval of its exact bootstrap distribution.", ""]
    # Selection tables
    lines += [f"## Hyper-parameter selection ({SELECTION_SPLIT} split)", ""]
    for task in tasks:
        lines += [f"### {task}", "", f"| method | grid point | final {SELECTION_SPLIT} reward | rollout reward "
                  f"(last {TAIL}) | chosen |", "|---|---|---|---|---|"]
        for (t, m), table in selection.items():
            if t != task:
                continue
            for row in table:
                ftr = "–" if row["final_test_reward"] is None else f"{row['final_test_reward']:.3f}"
                tail = "–" if row["tail_reward"] is None else f"{row['tail_reward']:.3f}"
                lines.append(f"| {m} | {point_tag(row['point'])} | {ftr} | {tail} | {'**yes**' if row['chosen'] else ''} |")
        lines.append("")
    # Main results
    stats: dict = {}
    lines += ["## Final greedy test reward", ""]
    for task in tasks:
        groups = {}
        initial = warm_start_reward(out, task)
        for method in exp.methods:
            if (task, method) not in chosen or not _matches(f"{task}/{method}", only):
                continue
            specs = [s for s in main_runs(exp, {(task, method): chosen[(task, method)]}, warm_starts)]
            stats[(task, method)] = _group_stats(specs, out, initial)
        ref = stats.get((task, REFERENCE_METHOD))
        rows = []
        for (t, method), g in stats.items():
            if t != task:
                continue
            if g["n"]:
                groups[method] = g
            diff = None if ref is None or method == REFERENCE_METHOD else paired_difference(
                ref["final_by_seed"], g["final_by_seed"])
            rows.append(f"| {method} | {point_tag(chosen[(task, method)])} | **{_pm(*g['final'])}** | "
                        f"{_ci(*g['final_ci'])} | {_diff(diff)} | {_pm(*g['peak'])} | {_pm(*g['tail'])} | "
                        f"{_pm(*g['wall'], digits=0)} | {g['n']}/{g['of']} |")
        before = "not measured" if initial is None else f"{initial:.3f}"
        lines += [f"### {task}", "", f"Warm start (shared by every run): greedy test reward {before}.", "",
                  f"| method | chosen | final test reward | 95% CI | {REFERENCE_METHOD} − method [95% bootstrap CI] | "
                  "peak test reward | final rollout reward | wall time per run (s) | runs |",
                  "|---|---|---|---|---|---|---|---|---|", *rows, ""]
        if groups:
            png = plot_groups(groups, res_dir / f"curves_{task}.png", f"{task}: mean ± std over seeds")
            lines += [f"![{task} curves]({png.name})", ""]
    # Studies
    for sname, s in exp.studies.items():
        lines += [f"## Study: {sname}", "",
                  f"`{s.method}` at its chosen point plus each variant's settings, seeds {list(s.seeds)}.", ""]
        for v, vs in s.variants.items():
            lines.append(f"- `{v}`: objective {json.dumps(vs['objective'])}, overrides {list(vs['overrides'])}")
        lines.append("")
        for task in tasks:
            if (task, s.method) not in chosen or not _matches(f"{task}/{sname}", only):
                continue
            groups = {}
            rows = []
            for v in s.variants:
                specs = [r for r in study_runs(exp, {(task, s.method): chosen[(task, s.method)]}, warm_starts)
                         if r.method == sname and r.variant == v]
                g = _group_stats(specs, out, warm_start_reward(out, task))
                if g["n"]:
                    groups[v] = g
                band = [float(np.mean(series(r, "inside_clip_frac")[1])) for r in g["records"]
                        if len(series(r, "inside_clip_frac")[1])]
                rows.append(f"| {v} | **{_pm(*g['final'])}** | {_pm(*g['peak'])} | {_pm(*g['tail'])} | "
                            f"{_pm(*seed_stats(band))} | {_pm(*g['wall'], digits=0)} | {g['n']}/{g['of']} |")
            lines += [f"### {task}", "", "| variant | final test reward | peak test reward | final rollout reward | "
                      "fraction inside the clip band | wall time per run (s) | runs |",
                      "|---|---|---|---|---|---|---|", *rows, ""]
            if groups:
                png = plot_groups(groups, res_dir / f"{sname}_{task}.png", f"{task}: {sname}", extra_key="inside_clip_frac")
                lines += [f"![{task} {sname}]({png.name})", ""]
    lines += ["## The paper's claims against these runs", "", *_claims(exp, stats, tasks), ""]
    all_done = [d for d in (out / "runs").rglob("done.json")] if (out / "runs").exists() else []
    total_wall = sum(json.loads(p.read_text())["wall_time_s"] for p in all_done)
    lines += ["## Runtime", "", f"- {len(all_done)} finished runs, {total_wall / 60:.1f} min of run wall time "
              f"in total" + (f"; this invocation took {elapsed / 60:.1f} min." if elapsed is not None else "."), ""]
    path = res_dir / "results.md"
    path.write_text("\n".join(lines))
    (res_dir / "selection.json").write_text(json.dumps(
        {f"{t}/{m}": {"chosen": chosen.get((t, m)), "grid": table} for (t, m), table in selection.items()},
        indent=2, default=str) + "\n")
    return path


# ---- the whole experiment -----------------------------------------------------------------------

def choose(exp: Experiment, out: Path, specs: Sequence[RunSpec]) -> tuple[dict, dict]:
    """(chosen point per (task, method), selection table per (task, method)) from finished selection runs."""
    chosen, tables = {}, {}
    by_group: dict = {}
    for s in specs:
        by_group.setdefault((s.task, s.method), []).append(s)
    for key, group in by_group.items():
        cands = [(s.point_dict, read_records(s.run_dir(out)), s.total_steps) for s in group
                 if is_finished(s.run_dir(out))]
        res = select_point(cands)
        if res is None:
            continue
        chosen[key], tables[key] = res
    return chosen, tables


def _selection_filter(exp: Experiment, only: Sequence[str] | None) -> list[str] | None:
    """``--only`` for the selection phase: a selected study also needs its method's selection runs."""
    if not only:
        return None
    extra = [f"{t}/{s.method}" for sname, s in exp.studies.items() for t in exp.tasks
             if _matches(f"{t}/{sname}", only)]
    return [*only, *extra]


def slowest_points(exp: Experiment) -> dict:
    """Each (task, method)'s grid point whose main-budget run the estimate makes longest: the dry run plans
    the later phases there (the selection has not chosen yet), so its total is an upper bound."""
    return {(t, m): max(grid_points(exp.methods[m].grid), key=lambda pt: estimate_seconds(exp, make_run(
        exp, t, m, pt, exp.seeds[0], total_steps=int(exp.budget["total_steps"]),
        eval_every=int(exp.budget["eval_every"]), phase="main")))
        for t in exp.tasks for m in exp.methods}


def say_plan(exp: Experiment, out: Path, tasks: Sequence[str], sel: Sequence[RunSpec], only, say, source: str) -> float:
    """``--dry-run``: every run of the plan with its estimate, the total per phase; returns the total (s)."""
    later = dedupe([*sel, *main_runs(exp, slowest_points(exp), None, only),
                    *study_runs(exp, slowest_points(exp), None, only)], out)
    say(f"experiment {exp.name}: {len(later)} runs ({len(sel)} selection), output {out}")
    per_phase: dict[str, float] = {}
    for s in later:
        done = is_finished(s.run_dir(out))
        est = 0.0 if done else estimate_seconds(exp, s)
        per_phase[s.phases[0]] = per_phase.get(s.phases[0], 0.0) + est
        say(f"  [{'+'.join(s.phases)}] {s.group} {point_tag(s.point_dict)} seed={s.seed} "
            f"steps={s.total_steps}  {'done' if done else f'~{est:.0f}s'}")
    warm = float(sum(exp.estimate.get("warm_start_s", {}).get(t, 0.0) for t in tasks
                     if not warm_start_eval_path(out, t).is_file()))
    total = warm + sum(per_phase.values())
    parts = ", ".join(f"{ph} {v / 60:.0f} min" for ph, v in per_phase.items())
    say(f"estimated runtime of the remaining runs: {total / 60:.0f} min (warm starts {warm / 60:.0f} min, {parts}; "
        f"jobs=1; the main and study runs at each method's slowest grid point, an upper bound; from the "
        f"'estimate' section of {source}, measured on one machine)")
    return total


def run_experiment(path: str | Path, *, only: Sequence[str] | None = None, jobs: int = 1, dry_run: bool = False,
                   output_dir: str | None = None, results_dir: str | None = None, progress: bool = True,
                   keep_checkpoints: bool = False, say: Callable[[str], None] = print) -> int:
    """Plan, run (or with ``dry_run`` print) and aggregate an experiment. Returns a process exit code."""
    exp = load_experiment(path)
    out = Path(output_dir or exp.output_dir)
    tasks = [t for t in exp.tasks if any(_matches(f"{t}/{m}", only) for m in [*exp.methods, *exp.studies])]
    if not tasks:
        raise ConfigError(f"--only {list(only or [])} matches no task/method of {path}")
    sel_only = _selection_filter(exp, only)
    sel = dedupe(selection_runs(exp, None, sel_only), out)
    if dry_run:
        say_plan(exp, out, tasks, sel, only, say, source=str(path))
        return 0

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    env = {}
    if exp.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", exp.compilation_cache)
        env["JAX_COMPILATION_CACHE_DIR"] = exp.compilation_cache
    warm = prepare_warm_starts(exp, out, tasks, say, progress=progress)
    kw = dict(jobs=jobs, progress=progress, keep_checkpoints=keep_checkpoints, env=env, say=say)
    sel = dedupe(selection_runs(exp, warm, sel_only), out)
    say(f"phase 1/3: selection, {len(sel)} runs")
    errors = execute(sel, out, **kw)
    chosen, tables = choose(exp, out, sel)
    for (t, m), p in chosen.items():
        say(f"  chosen {t}/{m}: {point_tag(p)}")
    main = dedupe(main_runs(exp, chosen, warm, only), out)
    say(f"phase 2/3: {len(exp.seeds)} seeds at the chosen points, {len(main)} runs")
    errors += execute(main, out, **kw)
    studies = dedupe(study_runs(exp, chosen, warm, only), out)
    if studies:
        say(f"phase 3/3: studies, {len(studies)} runs")
        errors += execute(studies, out, **kw)
    res = write_results(exp, out, chosen, tables, only, time.perf_counter() - t0, warm, results_dir)
    say(f"wrote {res}")
    if errors:
        say(f"{len(errors)} run(s) failed:\n  " + "\n  ".join(errors))
        return 1
    return 0
