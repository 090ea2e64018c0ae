"""What finished experiment runs logged, and the report made of it.

Reading runs (``metrics.jsonl``, ``done.json``): the greedy reward of the final evaluation, the rollout
reward over the last ``TAIL`` steps, the choice of a grid point (:func:`select_point`), curves averaged over
seeds. The report (:func:`write_results`): ``OUT/results.md`` (per task: final test reward mean, sample std
and 95% t interval over seeds, GDSD's paired difference to every baseline with an exact bootstrap interval,
from :mod:`gdsd_jax.experiments.stats`; the selection grid; a check of the paper's claims) and PNG curves
next to it (mean and spread over seeds).

The trainer logs the greedy reward of its eval split under ``test_reward`` whichever split that is: in a
selection run that key holds the validation reward.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gdsd_jax.experiments.spec import (
    REPORT_SPLIT,
    SELECTION_SPLIT,
    Experiment,
    RunSpec,
    main_runs,
    matches,
    point_tag,
    study_runs,
    warm_start_eval_path,
)
from gdsd_jax.experiments.stats import mean_ci, paired_bootstrap_ci, seed_stats
from gdsd_jax.training.metrics import parse_records

TAIL = 10  # steps averaged for "final rollout reward" and the selection tie-break

REFERENCE_METHOD = "gdsd"        # the paired differences are this method minus each other one


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
    candidate's numbers (``final_eval_reward`` on the run's eval split, ``chosen`` marks the pick), or None
    if no candidate has a final eval reward.
    """
    table = []
    best, best_key = None, None
    for i, (point, records, total) in enumerate(candidates):
        final_eval = final_test_reward(records, total)
        tail = tail_reward(records)
        table.append({"point": point, "final_eval_reward": final_eval, "tail_reward": tail, "chosen": False})
        if final_eval is None:
            continue
        key = (final_eval, -math.inf if tail is None else tail, -i)
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


def warm_start_reward(out: Path, task: str, split: str = REPORT_SPLIT) -> float | None:
    """The shared warm start's greedy reward on ``split`` (None before it was measured)."""
    p = warm_start_eval_path(out, task)
    return float(json.loads(p.read_text())[split]["reward"]) if p.is_file() else None


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
                final_eval = "–" if row["final_eval_reward"] is None else f"{row['final_eval_reward']:.3f}"
                tail = "–" if row["tail_reward"] is None else f"{row['tail_reward']:.3f}"
                picked = "**yes**" if row["chosen"] else ""
                lines.append(f"| {m} | {point_tag(row['point'])} | {final_eval} | {tail} | {picked} |")
        lines.append("")
    # Main results
    stats: dict = {}
    lines += ["## Final greedy test reward", ""]
    for task in tasks:
        groups = {}
        initial = warm_start_reward(out, task)
        for method in exp.methods:
            if (task, method) not in chosen or not matches(f"{task}/{method}", only):
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
            if (task, s.method) not in chosen or not matches(f"{task}/{sname}", only):
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
