"""``gdsd-jax experiment``: grid expansion, selection, aggregation math, resume-skip, and one micro run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from gdsd_jax.config_io import ConfigError
from gdsd_jax.experiments import report as ex_report
from gdsd_jax.experiments import runner as ex_runner
from gdsd_jax.experiments import spec as ex_spec
from gdsd_jax.experiments import stats as ex_stats

REPO = Path(__file__).resolve().parents[1]
SUDOKU = str(REPO / "configs/sudoku_tiny.yaml")
COUNTDOWN = str(REPO / "configs/countdown_tiny.yaml")


def _exp_dict(**over) -> dict:
    d = {
        "name": "t",
        "tasks": {"sudoku": {"config": SUDOKU, "overrides": ["task.kwargs.hold_out_validation=true"]},
                  "countdown": {"config": COUNTDOWN}},
        "common_overrides": ["optim.schedule=constant"],     # as the real grid: short runs, no warm-up
        "methods": {
            "gdsd": {"objective": {"name": "gdsd"}, "overrides": ["rl.advantage=loo"],
                     "grid": {"optim.lr": [1e-4, 3e-4, 1e-3], "objective.psi": [1.0, 10.0]}},
            "d1": {"objective": {"name": "d1"}, "overrides": ["rl.advantage=group_mean", "rl.scale_std=true"],
                   "grid": {"optim.lr": [1e-4, 3e-4, 1e-3]},
                   "task_overrides": {"countdown": ["objective.p_mask_prompt=0.3"]}},
        },
        "seeds": [0, 1, 2],
        "budget": {"prompts_per_step": 4, "num_generations": 4, "total_steps": 30, "eval_every": 10},
        "selection": {"seed": 0, "total_steps": 10, "eval_every": 0},
        "studies": {"clip": {"method": "gdsd", "seeds": [0, 1],
                             "variants": {"seq": {"objective": {"clip_mode": "sequence"},
                                                  "overrides": ["rl.num_iterations=2"]},
                                          "tok": {"objective": {"clip_mode": "token"},
                                                  "overrides": ["rl.num_iterations=2"]}}}},
    }
    d.update(over)
    return d


def _resolve(spec: ex_spec.RunSpec, out: Path):
    """The run's TrainConfig as the experiment writes it."""
    from gdsd_jax.config_io import load_config
    from gdsd_jax.training.config import TrainConfig

    return load_config(TrainConfig, ex_runner.write_run_config(spec, out))


# ---- grid expansion -----------------------------------------------------------------------------

def test_grid_points_is_the_cartesian_product_in_file_order():
    pts = ex_spec.grid_points({"optim.lr": [1, 2, 3], "objective.psi": [10, 20]})
    assert pts == [{"optim.lr": a, "objective.psi": b} for a in (1, 2, 3) for b in (10, 20)]
    assert ex_spec.grid_points({}) == [{}]


def test_expansion_counts_and_resolved_configs(tmp_path):
    exp = ex_spec.parse_experiment(_exp_dict())
    sel = ex_spec.selection_runs(exp)
    assert len(sel) == 2 * (6 + 3)                       # tasks x (gdsd 3x2 + d1 3)
    assert len({s.run_dir(tmp_path) for s in sel}) == len(sel)
    chosen = {(t, "gdsd"): {"optim.lr": 3e-4, "objective.psi": 10.0} for t in exp.tasks}
    chosen.update({(t, "d1"): {"optim.lr": 1e-3} for t in exp.tasks})
    main = ex_spec.main_runs(exp, chosen)
    assert len(main) == 2 * 2 * 3 and sorted({s.seed for s in main}) == [0, 1, 2]
    study = ex_spec.study_runs(exp, chosen)
    assert len(study) == 2 * 2 * 2                       # tasks x variants x study seeds

    # The budget and the chosen point reach the run config; the method's objective replaces the base one.
    d1_cd = next(s for s in main if s.task == "countdown" and s.method == "d1" and s.seed == 2)
    cfg = _resolve(d1_cd, tmp_path)
    assert (cfg.rl.prompts_per_step, cfg.rl.num_generations, cfg.rl.total_steps, cfg.eval.every) == (4, 4, 30, 10)
    assert cfg.rl.micro_batch_size == 16 and cfg.rl.seed == 2 and cfg.optim.lr == 1e-3
    assert cfg.rl.advantage == "group_mean" and cfg.rl.scale_std is True
    ocfg = cfg.objective
    assert ocfg.name == "d1" and ocfg.p_mask_prompt == 0.3
    assert ocfg.beta == 0.04 and ocfg.epsilon_low == 0.2   # official d1 values, not the base config's
    assert cfg.task.name == "countdown"
    tok = next(s for s in study if s.variant == "tok" and s.task == "sudoku")
    cfg = _resolve(tok, tmp_path)
    assert cfg.objective.clip_mode == "token" and cfg.rl.num_iterations == 2
    assert cfg.objective.psi == 10.0 and cfg.optim.lr == 3e-4
    # The sudoku task config samples dynamically (32 prompts rolled out); the budget rolls out exactly P.
    assert _resolve(tok, tmp_path).rollout_prompts == 4


def test_only_filter_and_dedupe_of_shared_runs(tmp_path):
    exp = ex_spec.parse_experiment(_exp_dict())
    sel = ex_spec.selection_runs(exp, only=["sudoku/gdsd"])
    assert {s.group for s in sel} == {"sudoku/gdsd"} and len(sel) == 6
    chosen = {("sudoku", "gdsd"): sel[4].point_dict}
    # A run planned twice (here: the main runs) runs once, its phases merged.
    main = ex_spec.main_runs(exp, chosen, only=["sudoku/gdsd"])
    both = ex_spec.dedupe([*sel, *main, *[dataclasses.replace(m, phases=("again",)) for m in main]], tmp_path)
    assert len(both) == 6 + 3
    assert [s.phases for s in both[6:]] == [("main", "again")] * 3
    assert len(ex_spec.selection_runs(exp, only=["*/d1"])) == 6
    assert len(ex_spec.selection_runs(exp, only=["countdown"])) == 9
    # Selecting a study also selects its method's learning-rate runs (the study needs the chosen point).
    sel_only = ex_runner._selection_filter(exp, ["sudoku/clip"])
    assert {s.group for s in ex_spec.selection_runs(exp, only=sel_only)} == {"sudoku/gdsd"}
    assert ex_spec.study_runs(exp, chosen, only=["sudoku/clip"]) and not ex_spec.main_runs(exp, chosen, only=["sudoku/clip"])


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["methods"]["gdsd"].pop("objective"), r"methods\.gdsd: missing key 'objective'"),
    (lambda d: d["methods"]["gdsd"].update(grid={"optim.lr": []}), r"methods\.gdsd\.grid\.optim\.lr"),
    (lambda d: d.update(seeds=[]), r"seeds"),
    (lambda d: d["budget"].update(total_steps=0), r"budget\.total_steps"),
    (lambda d: d.update(bogus=1), r"unknown key\(s\) \['bogus'\]"),
    (lambda d: d["methods"]["d1"].update(task_overrides={"chess": []}), r"unknown task 'chess'"),
    (lambda d: d["studies"]["clip"].update(method="nope"), r"studies\.clip\.method"),
    (lambda d: d["methods"]["d1"].update(overrides=["no_equals_sign"]), r"KEY=VALUE"),
])
def test_bad_experiment_files_name_the_key(mutate, match):
    d = _exp_dict()
    mutate(d)
    with pytest.raises(ConfigError, match=match):
        ex_spec.parse_experiment(d)


# ---- selection ----------------------------------------------------------------------------------

def _write_run(d: Path, test: dict[int, float], rollout: list[float], wall: float = 1.0) -> None:
    d.mkdir(parents=True, exist_ok=True)
    recs = [{"step": i + 1, "reward_mean": r} for i, r in enumerate(rollout)]
    for s, v in test.items():
        recs.append({"step": s, "test_reward": v})
    recs.sort(key=lambda r: r["step"])
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "done.json").write_text(json.dumps({"wall_time_s": wall}))


def test_selection_picks_the_best_final_eval_reward_from_metrics_files(tmp_path):
    exp = ex_spec.parse_experiment(_exp_dict())
    sel = [s for s in ex_spec.selection_runs(exp) if s.group == "sudoku/d1"]
    # final (step 10) test rewards 0.40, 0.55, 0.50; the 1e-4 run has the highest *peak* (0.7 at step 5),
    # which must not matter: the criterion is the final value.
    finals = [0.40, 0.55, 0.50]
    for s, f in zip(sel, finals):
        test = {0: 0.3, 10: f} | ({5: 0.7} if s.point_dict["optim.lr"] == 1e-4 else {})
        _write_run(s.run_dir(tmp_path), test, [0.2] * 10)
    chosen, tables = ex_runner.choose(exp, tmp_path, sel)
    assert chosen == {("sudoku", "d1"): {"optim.lr": 3e-4}}
    table = tables[("sudoku", "d1")]
    assert [r["final_eval_reward"] for r in table] == finals
    assert [r["chosen"] for r in table] == [False, True, False]


def test_selection_tie_break_and_unfinished_runs(tmp_path):
    pts = [{"optim.lr": 1e-4}, {"optim.lr": 3e-4}, {"optim.lr": 1e-3}]
    recs = [
        [{"step": 10, "test_reward": 0.5}] + [{"step": i, "reward_mean": 0.1} for i in range(1, 11)],
        [{"step": 10, "test_reward": 0.5}] + [{"step": i, "reward_mean": 0.3} for i in range(1, 11)],
        [{"step": 5, "test_reward": 0.9}],     # no final evaluation (stopped early): never chosen
    ]
    point, table = ex_report.select_point([(p, r, 10) for p, r in zip(pts, recs)])
    assert point == {"optim.lr": 3e-4}                   # equal final reward: higher last-10 rollout reward
    assert table[2]["final_eval_reward"] is None
    # Exact tie everywhere: the earlier grid point.
    point, _ = ex_report.select_point([(pts[0], recs[0], 10), (pts[1], recs[0], 10)])
    assert point == pts[0]
    assert ex_report.select_point([(pts[2], recs[2], 10)]) is None


# ---- aggregation math ---------------------------------------------------------------------------

def test_aggregate_curves_and_seed_stats_against_numpy():
    rng = np.random.default_rng(0)
    vals = rng.normal(size=(3, 7))
    steps = np.arange(0, 70, 10)
    runs = [[{"step": int(s), "test_reward": float(v)} for s, v in zip(steps, row)] for row in vals]
    runs[1].append({"step": 999, "test_reward": 5.0})   # a step only one seed logged is left out
    runs[2].append({"step": 20, "other": 1.0})
    s, m, sd = ex_report.aggregate_curves(runs, "test_reward")
    np.testing.assert_array_equal(s, steps)
    # Independent reference: sample mean and sample std (ddof 1) written out.
    n = vals.shape[0]
    mean_ref = vals.sum(0) / n
    std_ref = np.sqrt(((vals - mean_ref) ** 2).sum(0) / (n - 1))
    np.testing.assert_allclose(m, mean_ref, rtol=1e-12)
    np.testing.assert_allclose(sd, std_ref, rtol=1e-12)
    mean, std, k = ex_stats.seed_stats([0.2, 0.5, None, 0.8])
    assert k == 3 and mean == pytest.approx(0.5) and std == pytest.approx(0.3)


def test_selection_runs_evaluate_on_validation_and_the_reported_runs_on_test(tmp_path):
    """Hyper-parameters are chosen on the validation split; the chosen points are reported on the test split;
    no run repeats the shared warm start's step-0 evaluation."""
    exp = ex_spec.parse_experiment(_exp_dict())
    sel = ex_spec.selection_runs(exp)
    chosen = {(t, m): ex_spec.grid_points(exp.methods[m].grid)[0] for t in exp.tasks for m in exp.methods}
    later = [*ex_spec.main_runs(exp, chosen), *ex_spec.study_runs(exp, chosen)]
    for spec in (sel[0], sel[-1], later[0], later[-1]):
        cfg = _resolve(spec, tmp_path)
        assert cfg.eval.split == ("validation" if spec in sel else "test")
        assert cfg.eval.initial is False
    # A selection run at the main budget is not a main run: the two evaluate different splits.
    d = _exp_dict(selection={"seed": 0})
    exp = ex_spec.parse_experiment(d)
    sel = ex_spec.selection_runs(exp, only=["sudoku/gdsd"])
    main = ex_spec.main_runs(exp, {("sudoku", "gdsd"): sel[0].point_dict}, only=["sudoku/gdsd"])
    assert not {s.run_dir(tmp_path) for s in sel} & {s.run_dir(tmp_path) for s in main}


def test_final_tail_and_smooth():
    recs = [{"step": 0, "test_reward": 0.1}, {"step": 20, "test_reward": 0.4}, {"step": 10, "test_reward": 0.3}]
    recs += [{"step": i, "reward_mean": float(i)} for i in range(1, 21)]
    assert ex_report.final_test_reward(recs, 20) == 0.4 and ex_report.final_test_reward(recs, 30) is None
    # The shared warm start's reward becomes step 0 of runs that skipped their own evaluation, once.
    assert ex_report.with_initial(recs[1:], 0.2)[0] == {"step": 0, "test_reward": 0.2}
    assert ex_report.with_initial(recs, 0.2) == recs and ex_report.with_initial(recs[1:], None) == recs[1:]
    assert ex_report.tail_reward(recs, 10) == pytest.approx(np.mean(np.arange(11, 21)))
    v = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(ex_report.smooth(v, 2), [1.0, 2.0, 4.0, 6.0])


def test_write_results_tables_and_pngs(tmp_path):
    d = _exp_dict(studies={})
    d["methods"] = {"gdsd": d["methods"]["gdsd"], "espo": {"objective": {"name": "espo"}}}
    d["tasks"] = {"sudoku": {"config": SUDOKU}}
    exp = ex_spec.parse_experiment(d)
    chosen = {("sudoku", "gdsd"): {"optim.lr": 1e-4, "objective.psi": 1.0}, ("sudoku", "espo"): {}}
    finals = {"gdsd": [0.6, 0.7, 0.8], "espo": [0.5, 0.5, 0.2]}
    for s in ex_spec.main_runs(exp, chosen):
        f = finals[s.method][s.seed]
        peak = 0.9 if s.method == "espo" else f
        _write_run(s.run_dir(tmp_path), {10: peak, 20: f, 30: f}, [0.4 + 0.01 * i for i in range(30)],
                   wall=10.0 + s.seed)
    ex_spec.warm_start_eval_path(tmp_path, "sudoku").parent.mkdir(parents=True)
    ex_spec.warm_start_eval_path(tmp_path, "sudoku").write_text(json.dumps(
        {"validation": {"reward": 0.45, "solved": 0.1}, "test": {"reward": 0.5, "solved": 0.1}}))
    path = ex_report.write_results(exp, tmp_path, chosen, {("sudoku", "gdsd"): [
        {"point": chosen[("sudoku", "gdsd")], "final_eval_reward": 0.6, "tail_reward": 0.5, "chosen": True}]})
    text = path.read_text()
    assert (tmp_path / "curves_sudoku.png").stat().st_size > 1000
    final = text.split("## Final greedy test reward")[1].splitlines()
    gdsd_row = next(line for line in final if line.startswith("| gdsd |"))
    assert "0.700 ± 0.100 (n=3)" in gdsd_row                     # mean ± sample std of 0.6, 0.7, 0.8
    assert "[0.452, 0.948]" in gdsd_row                          # 0.7 -+ t(0.975, 2) 4.3027 * 0.1 / sqrt(3)
    assert "11 ± 1 (n=3)" in gdsd_row                            # wall times 10, 11, 12
    assert "greedy test reward 0.500" in text                    # the warm start, measured once
    espo_row = next(line for line in final if line.startswith("| espo |"))
    assert f"{np.mean([0.5, 0.5, 0.2]):.3f} ± {np.std([0.5, 0.5, 0.2], ddof=1):.3f}" in espo_row
    # gdsd - espo per seed: 0.1, 0.2, 0.6. Of the 27 equally likely resamples only (0.1, 0.1, 0.1) has mean
    # 0.1 (probability 1/27 > 2.5%) and only (0.6, 0.6, 0.6) mean 0.6: the 95% interval is [0.1, 0.6].
    assert "+0.300 [+0.100, +0.600] (n=3)" in espo_row
    assert "ESPO drifts after its peak** — held" in text         # mean curve 0.9 -> 0.4
    assert "## Hyper-parameter selection (validation split)" in text
    assert "gdsd stable** — held" in text


# ---- resume: finished runs are skipped ----------------------------------------------------------

def test_execute_skips_finished_runs_and_records_failures(tmp_path):
    exp = ex_spec.parse_experiment(_exp_dict())
    specs = [s for s in ex_spec.selection_runs(exp) if s.group == "sudoku/d1"]
    _write_run(specs[0].run_dir(tmp_path), {10: 0.5}, [0.1] * 10)          # finished before
    calls = []

    def runner(cfg_path: Path):
        calls.append(cfg_path.parent)
        if "lr=0.001" in cfg_path.parent.name:
            raise RuntimeError("boom")
        _write_run(cfg_path.parent, {10: 0.6}, [0.2] * 10)
        (cfg_path.parent / "done.json").unlink()          # the experiment writes done.json itself

    errors = ex_runner.execute(specs, tmp_path, runner=runner, progress=False, say=lambda *_: None)
    assert calls == [specs[1].run_dir(tmp_path), specs[2].run_dir(tmp_path)]
    assert len(errors) == 1 and "boom" in errors[0]
    done = json.loads((specs[1].run_dir(tmp_path) / "done.json").read_text())
    assert done["final_test_reward"] == 0.6 and done["wall_time_s"] >= 0
    assert yaml.safe_load((specs[1].run_dir(tmp_path) / "run_config.yaml").read_text())["optim"]["lr"] == 3e-4
    calls.clear()
    ex_runner.execute(specs, tmp_path, runner=runner, progress=False, say=lambda *_: None)
    assert calls == [specs[2].run_dir(tmp_path)]               # only the failed run is retried


# ---- end to end through the command --------------------------------------------------------------

@pytest.mark.slow
def test_micro_experiment_end_to_end(tmp_path, capsys):
    from gdsd_jax.cli import main

    tiny = [
        "model.overrides={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 2, mlp_dim: 64}",
        "warm_start.mode=none", "eval.max_examples=8", "eval.batch_size=8", "task.kwargs.hold_out_validation=true",
        "sampling.steps=4", "eval.sampling={temperature: 0.0, steps: 4}",
    ]
    spec = {
        "name": "micro", "output_dir": str(tmp_path / "out"),
        "tasks": {"sudoku": {"config": SUDOKU, "overrides": tiny}},
        "common_overrides": ["tensorboard=false", "checkpoint.every=0", "checkpoint.async_save=false",
                             "optim.schedule=constant"],
        "methods": {"gdsd": {"objective": {"name": "gdsd", "beta": 0.0},
                             "grid": {"optim.lr": [1e-4, 1e-3]}}},
        "seeds": [0],
        "budget": {"prompts_per_step": 4, "num_generations": 2, "total_steps": 2, "eval_every": 0},
        "estimate": {"overhead_s": 5, "eval_s": {"sudoku": 1}, "step_s": {"sudoku": {"gdsd": 0.5}}},
    }
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    assert main(["experiment", str(cfg), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "3 runs (2 selection)" in dry and "estimated runtime" in dry
    assert "~7s" in dry                         # 5 + 2 * 0.5 + 1 * 1 (the final evaluation only)
    assert not (tmp_path / "out" / "runs").exists()

    assert main(["experiment", str(cfg), "--no-progress"]) == 0
    out = tmp_path / "out"
    done = sorted(out.glob("runs/sudoku/gdsd/*/done.json"))
    assert len(done) == 3                       # 2 selection runs (validation) + the chosen point's (test)
    for p in done:
        recs = ex_report.read_records(p.parent)
        assert [r["step"] for r in recs if "reward_mean" in r] == [1, 2]
        assert [r["step"] for r in recs if "test_reward" in r] == [2]       # no step-0 evaluation
        assert ex_report.final_test_reward(recs, 2) is not None
        assert not (p.parent / "checkpoints").exists()
        # Both runs start from the one shared initial checkpoint.
        assert yaml.safe_load((p.parent / "run_config.yaml").read_text())["model"]["checkpoint"] == \
            str(out / "warm_starts" / "sudoku")
    text = (out / "results.md").read_text()
    assert "| gdsd |" in text and (out / "curves_sudoku.png").exists()
    sel = json.loads((out / "selection.json").read_text())
    assert sel["sudoku/gdsd"]["chosen"]["optim.lr"] in (1e-4, 1e-3)
    capsys.readouterr()
    # Re-running finds everything finished and only re-aggregates.
    assert main(["experiment", str(cfg), "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert "2 of 2 runs already finished" in again and "1 of 1 runs already finished" in again
    assert set(json.loads(ex_spec.warm_start_eval_path(out, "sudoku").read_text())) == {"validation", "test"}
