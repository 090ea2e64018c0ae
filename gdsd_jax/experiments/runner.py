"""Running an experiment: GDSD against the baselines over tasks, learning rates and seeds, then aggregation.

An experiment file (:mod:`gdsd_jax.experiments.spec`) names the tasks, the methods with their grids, a
rollout budget shared by every method, the seeds, and optional studies. :func:`run_experiment` then:

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
5. **Aggregation.** ``OUT/results.md`` and PNG curves next to it (:mod:`gdsd_jax.experiments.report`).

Runs live in ``OUT/runs/TASK/METHOD/TAG-HASH``; the hash covers the run's whole resolved config (output
directory and warm-start path excluded), so a run shared by two phases (e.g. the seed-0 selection run at
the main budget) executes once, and a finished run (``done.json``) is skipped: an interrupted experiment
resumes where it stopped. A run interrupted mid-way restarts from its last checkpoint (``--resume``).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
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
    to_dict,
)
from gdsd_jax.experiments.report import final_test_reward, is_finished, read_records, select_point, write_results
from gdsd_jax.experiments.spec import (
    REPORT_SPLIT,
    SELECTION_SPLIT,
    Experiment,
    RunSpec,
    dedupe,
    grid_points,
    load_experiment,
    main_runs,
    make_run,
    matches,
    point_tag,
    selection_runs,
    study_runs,
    warm_start_eval_path,
)
from gdsd_jax.rl.run import run_train
from gdsd_jax.sft.run import warm_start
from gdsd_jax.training.config import TrainConfig
from gdsd_jax.training.evaluate import evaluate
from gdsd_jax.training.setup import build_mesh, build_model, build_task_and_adapter, eval_examples


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
             if matches(f"{t}/{sname}", only)]
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
    tasks = [t for t in exp.tasks if any(matches(f"{t}/{m}", only) for m in [*exp.methods, *exp.studies])]
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
