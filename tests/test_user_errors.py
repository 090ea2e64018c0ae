"""Errors at start-up and one line each: config values checked by validate() before anything is written, and
the command line printing every user error as one line (``--debug`` for the traceback) without leaving an
empty run directory behind."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import typing

import pytest

from gdsd_jax import cli
from gdsd_jax.config_io import ConfigError, load_config, read_yaml, to_dict
from gdsd_jax.objectives.config import CONFIG_CLASSES, objective_config
from gdsd_jax.training.config import TrainConfig
from tests.test_rl_trainer import REPO, TINY

CONFIG = str(REPO / "configs/sudoku_tiny.yaml")


def _cfg(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, CONFIG, list(overrides))


# ---- validate(): every value, before anything is written ------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("optim.b1=1.5", r"optim\.b1=1\.5: expected a finite number in \[0, 1\)"),
    ("optim.b2=-1", r"optim\.b2=-1\.0: expected a finite number in \[0, 1\)"),
    ("optim.max_grad_norm=-1", r"optim\.max_grad_norm=-1\.0: expected a finite number > 0"),
    ("optim.weight_decay=-0.1", r"optim\.weight_decay=-0\.1: expected a finite number >= 0"),
    ("optim.lr=.nan", r"optim\.lr=nan: expected a finite number > 0"),
    ("optim.lr=.inf", r"optim\.lr=inf: expected a finite number > 0"),
    ("rl.micro_batch_size=0", r"rl\.micro_batch_size=0: expected an integer > 0"),
    ("rl.num_generations=1", r"rl\.num_generations=1: expected an integer >= 2 \(group advantages"),
    ("sft.steps=-1", r"sft\.steps=-1: expected an integer >= 0"),
    ("sft.batch_size=0", r"sft\.batch_size=0: expected an integer > 0"),
    ("sft.b1=1.0", r"sft\.b1=1\.0: expected a finite number in \[0, 1\)"),
    ("eval.max_examples=-3", r"eval\.max_examples=-3: expected an integer > 0"),
    ("task.prompt_length=-2", r"task\.prompt_length=-2: expected an integer > 0"),
    ("lora.alpha=-1", r"lora\.alpha=-1\.0: expected a finite number > 0"),
    ("lora.dropout=0.05", r"config key 'lora\.dropout' was removed \(adapter dropout is not implemented"),
    ("distributed.mesh=bogus", r"distributed\.mesh='bogus': bad mesh entry 'bogus'"),
    ("distributed.mesh=data=0", r"distributed\.mesh='data=0': bad mesh entry"),
    ("sampling.block_length=5", r"sampling: .*gen_length=16 is not divisible by block_length=5"),
    ("sampling.steps=0", r"sampling: SamplingConfig\.steps=0: expected an integer > 0"),
    ("eval.sampling={block_length: 3}", r"eval\.sampling: .*not divisible by block_length=3"),
    ("eval.sampling={temprature: 0.0}", r"unknown config key\(s\) \['eval\.sampling\.temprature'\]"),
    ("objective.psi=.nan", r"objective: GDSDConfig\.psi=nan: expected a finite number"),
    ("objective.num_t=4", r"objective: objective 'gdsd' has no setting 'num_t' \(a setting of spg only\)"),
    ("objective={name: spg, beta: 0.1}", r"objective 'spg' has no setting 'beta'"),
    ("model.preset=nope", r"^model\.preset: unknown model preset 'nope'"),
    ("task.name=chess", r"task: unknown task 'chess'"),
    ("task.kwargs={path: x.jsonl}", r"task 'sudoku' takes no argument\(s\) \['path'\]; valid: \['train_file'"),
    # the objective's ranges: psi scales the advantage (<= 0 removes or reverses the learning signal)
    ("objective.psi=-1", r"objective: GDSDConfig\.psi=-1\.0: expected a finite number > 0"),
    ("objective.psi=0", r"objective: GDSDConfig\.psi=0\.0: expected a finite number > 0"),
    ("objective={name: spg, min_t: 0.5, max_t: 0.2}", r"SPGConfig\.max_t=0\.2: expected >= min_t=0\.5"),
    # seeds (2**80 used to be an OverflowError after the model was built)
    ("rl.seed=1208925819614629174706176", r"rl\.seed=1208925819614629174706176: expected an integer in "
                                          r"\[0, 4294967295\]"),
    ("sft.seed=-1", r"sft\.seed=-1: expected an integer in \[0, 4294967295\]"),
    ("eval.split=bogus", r"eval\.split: 'bogus' is not one of \['train', 'validation', 'test'\]"),
    # the sequence against the model (the tiny preset holds 64 tokens; its prompt takes 17)
    ("sampling.gen_length=64", r"^sampling\.gen_length=64 \+ task\.prompt_length=17 = 81 exceeds the model's "
                               r"max_seq_len=64; .*at most 47 tokens"),
    ("eval.sampling={gen_length: 64}", r"^eval\.sampling\.gen_length=64 \+ task\.prompt_length=17 = 81 exceeds"),
    ("model.overrides={max_seq_len: 32}", r"sampling\.gen_length=16 \+ task\.prompt_length=17 = 33 exceeds the "
                                          r"model's max_seq_len=32"),
    # reward weights weigh the chat format's reward functions
    ("rl.reward_weights={sudoku: 2.0}", r"rl\.reward_weights=\{'sudoku': 2\.0\} weighs the chat format's "
                                        r"reward functions; task\.format=compact"),
])
def test_a_bad_value_fails_in_validate_naming_key_value_and_expectation(override, message):
    # The sections built from their own classes (sampling, objective) fail as the file is read, the
    # cross-field checks in validate(): both before anything is written.
    with pytest.raises(ConfigError, match=message):
        _cfg(override).validate()


def test_every_numeric_setting_declares_its_range():
    """A numeric field added without a range would be accepted whatever its value: the declaration is the rule."""
    unranged = []
    sections = [(s.name, typing.get_type_hints(TrainConfig)[s.name]) for s in dataclasses.fields(TrainConfig)]
    sections += [(f"objective[{name}]", cls) for name, cls in CONFIG_CLASSES.items()]
    for section, cls in sections:
        if not dataclasses.is_dataclass(cls):
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            scalar = {hint} if typing.get_origin(hint) is None else set(typing.get_args(hint)) - {type(None)}
            if typing.get_origin(hint) in (dict, tuple, list):
                continue
            if scalar & {int, float} and "range" not in f.metadata:
                unranged.append(f"{section}.{f.name}")
    assert unranged == []


def test_the_shipped_configs_validate():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(TrainConfig, path).validate()


def _restated_defaults(raw: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Keys of ``raw`` whose value equals the default at the same place (mapping-valued settings compared whole)."""
    out = []
    for key, value in raw.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict) and default:
            out += _restated_defaults(value, default, f"{prefix}{key}.")
        elif value == default and f"{prefix}{key}" != "objective.name":     # the name picks the settings class
            out.append(f"{prefix}{key}={value!r}")
    return out


def test_the_embedded_default_states_only_deviations():
    """One default per setting: the embedded default's file sets only what differs from the classes' defaults
    (the objective's: the chosen method's), so the two cannot drift apart."""
    raw = read_yaml(CONFIG)
    cfg = load_config(TrainConfig, CONFIG)
    defaults = to_dict(TrainConfig(objective=objective_config(cfg.objective.name)))
    assert _restated_defaults(raw, defaults) == []


def test_global_batches_are_checked_against_the_devices():
    cfg = _cfg("rl.rollout_prompts_per_step=null", "rl.prompts_per_step=3", "rl.num_generations=2",
               "rl.micro_batch_size=6", "warm_start.mode=none").validate()
    cfg.validate(num_devices=2)                  # 6 rows over 2 devices: fine
    with pytest.raises(ConfigError, match=r"rl\.prompts_per_step\*rl\.num_generations=6 does not split evenly "
                                          r"over 4 data-parallel devices"):
        cfg.validate(num_devices=4)
    with pytest.raises(ConfigError, match=r"rl\.prompts_per_step=3 does not split evenly over 2 processes"):
        cfg.validate(num_devices=2, num_processes=2)
    with pytest.raises(ConfigError, match=r"sft\.batch_size=100 does not split evenly"):
        _cfg("sft.batch_size=100").validate(num_devices=8)
    # the tensor axis does not split the batch: 8 devices as fsdp=2 x tensor=4 leave 2 batch ways
    _cfg("rl.rollout_prompts_per_step=null", "rl.prompts_per_step=3", "rl.num_generations=2",
         "rl.micro_batch_size=6", "warm_start.mode=none",
         "distributed.mesh=data=1,fsdp=2,tensor=4").validate(num_devices=8)


def test_an_indivisible_batch_fails_before_the_run_directory_is_written(tmp_path):
    from gdsd_jax.rl.run import run_train

    out = tmp_path / "run"
    cfg = load_config(TrainConfig, CONFIG, TINY + [f"output_dir={out}", "rl.prompts_per_step=3",
                                                   "rl.num_generations=2", "rl.micro_batch_size=6"])
    with pytest.raises(ConfigError, match="8 data-parallel devices"):   # the 8 fake CPU devices of conftest
        run_train(cfg, progress=False)
    assert not out.exists()


# ---- the command line: one line, no empty run directory --------------------------------------------

def _train(capsys, out, *extra, config=CONFIG) -> tuple[int, str]:
    code = cli.main(["train", "--config", str(config), "--no-progress", "--output-dir", str(out), *TINY, *extra])
    return code, capsys.readouterr().err


def _one_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("gdsd-jax train: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("override, needle", [
    ("rl.prompts=3", "rl.prompts"), ("model.preset=nope", "unknown model preset 'nope'"),
    ("task.name=chess", "unknown task 'chess'"), ("lora.dropout=0.05", "config key 'lora.dropout' was removed"),
    ("model.overrides={bogus: 1}", "bogus"), ("not_an_override", "expected KEY=VALUE"),
])
def test_config_errors_are_one_line_and_write_nothing(tmp_path, capsys, override, needle):
    code, err = _train(capsys, tmp_path / "run", override)
    assert code == 1
    _one_line(err, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, needle", [
    (["task.prompt_length=5"], "task.prompt_length=5 is shorter than the task's longest prompt (17 tokens)"),
    (["eval.split=validation"], "eval.split='validation': the shipped sudoku validation split needs"),
    (["task.format=chat", "rl.reward_weights={nope: 1.0}"],
     "rl.reward_weights names unknown reward function(s) ['nope']; task 'sudoku' has ['sudoku']"),
])
def test_settings_that_need_the_task_fail_before_the_model_is_built(tmp_path, capsys, monkeypatch, overrides,
                                                                       needle):
    """Checked against the task itself, at start: no model is built and no run directory written."""
    from gdsd_jax.rl import run

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the settings were checked")

    monkeypatch.setattr(run, "build_model", no_model)
    code, err = _train(capsys, tmp_path / "run", *overrides)
    assert code == 1
    _one_line(err, needle)
    assert not (tmp_path / "run").exists()


def test_a_sandbox_layer_the_host_cannot_give_stops_the_code_task_at_start(tmp_path, capsys, monkeypatch):
    """Fail closed: without its per-run cgroup the code sandbox refuses to start, in one line naming the layer,
    the cause and the setting that accepts weaker isolation; nothing is built or written."""
    import gdsd_jax.tasks.sandbox as sandbox_module
    from gdsd_jax.rl import run

    class NoCgroup:
        kind, error = None, "cgroup v2 controllers ['pids'] are not delegated (test)"

    monkeypatch.setattr(sandbox_module, "cgroup_manager", lambda: NoCgroup())
    sandbox_module.default_sandbox.cache_clear()
    monkeypatch.setattr(run, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    data = tmp_path / "code.jsonl"
    data.write_text('{"question": "q", "test_cases": ["assert f(1) == 2"]}\n')
    try:
        code, err = _train(capsys, tmp_path / "run", "task.name=code", "task.format=chat",
                           f"task.kwargs={{train_file: {data}, test_file: {data}}}")
    finally:
        sandbox_module.default_sandbox.cache_clear()
    assert code == 1
    _one_line(err, "code sandbox: the per-run cgroup (memory and process caps) layer cannot be set up here",
              "not delegated (test)", "cgroup='auto'")
    assert not (tmp_path / "run").exists()


def test_an_empty_or_duplicate_key_config_file_is_one_line(tmp_path, capsys):
    """An empty --config is the defaults, whose 256 generated tokens do not fit the tiny default model: named
    at start. A key repeated in one mapping is refused (YAML would keep the last silently)."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    code, err = cli.main(["train", "--config", str(empty), "--output-dir", str(tmp_path / "run")]), \
        capsys.readouterr().err
    assert code == 1
    _one_line(err, "sampling.gen_length=256 + task.prompt_length=17 = 273 exceeds the model's max_seq_len=64")
    twice = tmp_path / "twice.yaml"
    twice.write_text("rl:\n  seed: 1\n  total_steps: 4\n  seed: 2\n")
    code, err = _train(capsys, tmp_path / "run", config=twice)
    assert code == 1
    _one_line(err, str(twice), "line 4", "duplicate key 'seed' (first at line 2; the last would win)")
    assert not (tmp_path / "run").exists()


def test_overrides_are_accepted_in_any_position(tmp_path, capsys):
    """KEY=VALUE after a flag is an override like any other (it used to be 'unrecognized arguments'); the
    later of two settings of one key wins; anything else stray is still refused."""
    out = str(tmp_path / "run")
    code = cli.main(["train", "--config", CONFIG, "rl.seed=1", "--no-progress", "rl.prompts=3", "--output-dir", out])
    assert code == 1
    _one_line(capsys.readouterr().err, "rl.prompts")
    args_seen = {}

    def capture(args):
        args_seen["overrides"] = list(args.overrides)
        return 0

    parser_args = ["train", "rl.seed=1", "--no-progress", "rl.seed=2", "--resume", "optim.lr=0.1"]
    import gdsd_jax.commands.train as train_command

    original = train_command.run
    train_command.run = capture
    try:
        assert cli.main(parser_args) == 0
    finally:
        train_command.run = original
    assert args_seen["overrides"] == ["rl.seed=1", "rl.seed=2", "optim.lr=0.1"]
    assert load_config(TrainConfig, CONFIG, args_seen["overrides"]).rl.seed == 2
    assert cli.main(["train", "--config", CONFIG, "--no-progress", "stray", "--output-dir", out]) == 1
    _one_line(capsys.readouterr().err, "bad override 'stray': expected KEY=VALUE")
    assert not (tmp_path / "run").exists()


def test_debug_flag_and_env_var_show_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="lora.dropout"):
        cli.main(["train", "--debug", "--config", CONFIG, "--output-dir", str(tmp_path / "a"), "lora.dropout=0.1"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ConfigError, match="lora.dropout"):
        cli.main(["train", "--config", CONFIG, "--output-dir", str(tmp_path / "b"), "lora.dropout=0.1"])


def test_malformed_and_non_utf8_yaml_name_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: sudoku_tiny\nrl: [unclosed\noptim:\n  lr: 1\n")
    code, err = _train(capsys, tmp_path / "run", config=bad)
    assert code == 1
    line = _one_line(err, str(bad), "malformed YAML")
    assert "line 4" in line        # PyYAML reports where the flow sequence turned out to be unclosed
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("model:\n  preset: sudoku_tiny\n# caf\u00e9\n".encode("latin-1"))
    code, err = _train(capsys, tmp_path / "run", config=latin)
    assert code == 1
    _one_line(err, str(latin), "line 3", "not UTF-8")
    bom = tmp_path / "bom.yaml"        # a UTF-8 byte-order mark (Windows editors) is fine
    bom.write_bytes(b"\xef\xbb\xbf" + (REPO / "configs/sudoku_tiny.yaml").read_bytes())
    assert load_config(TrainConfig, bom).model.preset == "sudoku_tiny"
    assert not (tmp_path / "run").exists()


def test_data_and_nonfinite_errors_through_the_cli_are_one_line(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "train.jsonl"
    bad.write_bytes(b'{"Puzzle": "0000000000000000", "Solution": "12\xff"}\n')
    code, err = _train(capsys, tmp_path / "run", "rl.total_steps=1", f"task.kwargs={{train_file: {bad}}}")
    assert code == 1
    _one_line(err, str(bad), "not UTF-8")
    assert not (tmp_path / "run").exists()       # created by the run, removed again since it held no file

    from gdsd_jax.rl import run as run_mod
    from gdsd_jax.rl.trainer import NonFiniteError

    def nonfinite(cfg, **kw):
        raise NonFiniteError("5 non-finite updates in a row at step 3; stopping")

    monkeypatch.setattr(run_mod, "run_train", nonfinite)
    code, err = _train(capsys, tmp_path / "run2")
    assert code == 1
    _one_line(err, "5 non-finite updates in a row at step 3")


@pytest.mark.slow
def test_run_directory_lifecycle_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """One run directory through every start-up case: --resume with no checkpoint yet (said, then a fresh
    start), disk full at step 2 (one line naming the cause), the directory again without --resume, --resume
    with another model, --resume recovering from the disk-full stop, and --resume of the finished run (no
    second final evaluation)."""
    from gdsd_jax.training.metrics import MetricsLogger

    out = tmp_path / "run"
    real_log = MetricsLogger.log

    def log(self, step, metrics):    # the disk fills up after the checkpoint of step 1
        if step == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "metrics.jsonl"))
        return real_log(self, step, metrics)

    monkeypatch.setattr(MetricsLogger, "log", log)
    code = cli.main(["train", "--config", CONFIG, "--no-progress", "--output-dir", str(out), *TINY,
                     "rl.total_steps=2", "--resume"])
    captured = capsys.readouterr()
    assert code == 1
    assert f"--resume: no checkpoint in {out / 'checkpoints'}; starting from step 0" in captured.out
    _one_line(captured.err, "no space left on the device while writing", "metrics.jsonl", "--resume")
    monkeypatch.setattr(MetricsLogger, "log", real_log)

    code, err = _train(capsys, out, "rl.total_steps=2")
    assert code == 1
    _one_line(err, "already holds an earlier run (checkpoints", "--resume", "--overwrite")
    code, err = _train(capsys, out, "rl.total_steps=2", "model.overrides.hidden_size=64", "--resume")
    assert code == 1
    _one_line(err, "config mismatch in model")

    code, err = _train(capsys, out, "rl.total_steps=2", "--resume")      # space freed: the run recovers
    assert code == 0, err
    metrics = (out / "metrics.jsonl").read_text()
    steps = [json.loads(x)["step"] for x in metrics.splitlines()]
    assert steps == [0, 1, 2, 2]         # before, steps 1 and 2, the final evaluation at step 2

    code = cli.main(["train", "--config", CONFIG, "--no-progress", "--output-dir", str(out), *TINY,
                     "rl.total_steps=2", "--resume"])
    assert code == 0
    assert "the run finished at step 2" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == metrics


def test_a_directory_with_an_old_run_is_refused_before_anything_is_written(tmp_path, capsys):
    """Only an old metrics.jsonl (e.g. the checkpoints were deleted): the run stops at start naming the files and
    the options, and the file is left as it was."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "test_reward": 0.5}\n')
    code, err = _train(capsys, out, "rl.total_steps=1")
    assert code == 1
    _one_line(err, "already holds an earlier run (metrics.jsonl)", "--resume", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 0, "test_reward": 0.5}\n'


def test_overwrite_deletes_the_earlier_runs_files_only(tmp_path, capsys, monkeypatch):
    """--overwrite deletes what a run writes (checkpoints, metrics, ...) before the new run builds its model, and
    leaves other files alone. The run is stopped right after that point: what follows is an ordinary run."""
    from gdsd_jax.rl import run as run_mod

    out = tmp_path / "run"
    (out / "checkpoints" / "3").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    (out / "notes.txt").write_text("mine")

    def stop(cfg, mesh):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "build_model", stop)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["train", "--config", CONFIG, "--no-progress", "--output-dir", str(out), *TINY, "--overwrite"])
    assert not (out / "metrics.jsonl").exists() and (out / "notes.txt").read_text() == "mine"
    assert not any((out / "checkpoints").iterdir())       # step 3 is gone (the new run made the directory again)
    assert "--overwrite: deleted the earlier run's checkpoints, metrics.jsonl in" in capsys.readouterr().out


def test_disk_full_reported_by_tensorstore_is_recognised():
    """Orbax's array writer (TensorStore) reports ENOSPC as a ValueError carrying the OS message (the text of a
    real tmpfs-full run); wrapped in Orbax's own error it is still the disk-full line, with the file."""
    text = ('RESOURCE_EXHAUSTED: Error writing "opt_state.1.0.count/0" in OCDBT database at local file "/r/c/2.tmp/'
            'ocdbt.process_0/": Failed writing: "/r/c/2.tmp/ocdbt.process_0/d/78109e": Failed to write 289329 '
            "bytes to file 14: No space left on device [os_error_code='28']")
    try:
        try:
            raise ValueError(text)
        except ValueError as inner:
            raise RuntimeError("Save Finalize thread (save_finalize) failed.") from inner
    except RuntimeError as outer:
        message = cli.user_error_message(outer)
    assert message.startswith("no space left on the device while writing /r/c/2.tmp/ocdbt.process_0/d/78109e;")
    assert cli.user_error_message(RuntimeError("Save Finalize thread failed.")) is None     # a bug: traceback


def test_a_bad_allocator_setting_does_not_break_help_and_is_one_line(tmp_path):
    env = {**os.environ, "GDSD_JAX_ALLOCATOR": "jemalloc", "PYTHONPATH": str(REPO)}
    helped = subprocess.run([sys.executable, "-m", "gdsd_jax.cli", "--help"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0, helped.stderr
    assert "train" in helped.stdout
    run = subprocess.run([sys.executable, "-m", "gdsd_jax.cli", "plot", str(tmp_path)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip() == ("gdsd-jax plot: error: GDSD_JAX_ALLOCATOR='jemalloc': expected one of "
                                  "tcmalloc, system (or unset)")
