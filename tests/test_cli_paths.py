"""A newcomer's paths through the command line: each works or stops at start with one line naming the mismatch.

The tiny upstream directories come from ``helpers_hf`` (written with the ``safetensors`` library); nothing here
trains (the paths that do are in test_policy_export.py and test_policy_torch.py).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers_hf import make_hf_dir

from gdsd_jax import cli
from gdsd_jax.config_io import ConfigError, load_config
from gdsd_jax.training.config import TrainConfig
from tests.test_rl_trainer import REPO, TINY

CONFIG = str(REPO / "configs/sudoku_tiny.yaml")
#: The compact Sudoku vocabulary: 8 ids, mask 6, eos 7.
SUDOKU_DIMS = dict(d=32, layers=1, heads=2, kv=2, mlp=48, vocab=8, mask=6, eos=7)


def _one_line(err: str, command: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"gdsd-jax {command}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A tiny LLaDA-layout upstream directory whose vocabulary is the compact Sudoku one."""
    path, _, _ = make_hf_dir(tmp_path_factory.mktemp("hf") / "llada", "llada", **SUDOKU_DIMS)
    return path


# ---- the default config with an upstream checkpoint ------------------------------------------------

def test_the_presets_architecture_overrides_are_not_applied_to_a_checkpoint(upstream):
    """The default config sets learned_positions (the tiny preset's architecture) and scan_layers (an execution
    switch): with model.checkpoint only the execution switch applies, and the model is the checkpoint's."""
    from gdsd_jax.distributed.mesh import make_mesh
    from gdsd_jax.training.setup import build_model

    cfg = load_config(TrainConfig, CONFIG, [f"model.checkpoint={upstream}"]).validate()
    assert cfg.model.split_overrides() == ({"scan_layers": False}, ["learned_positions"])
    model_cfg, params = build_model(cfg, make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1]))
    assert not model_cfg.learned_positions and not model_cfg.scan_layers
    assert "pos_embed" not in params and model_cfg.hidden_size == SUDOKU_DIMS["d"]
    # the memory planner resolves the same model without reading weights
    from gdsd_jax.experiments.plan import resolve_model_config

    planned, source = resolve_model_config(cfg)
    assert planned == model_cfg and source == f"Hugging Face config {upstream}"
    # a preset keeps every override
    preset = load_config(TrainConfig, CONFIG, []).model
    assert preset.split_overrides() == ({"learned_positions": True, "scan_layers": False}, [])


# ---- vocabulary against the task's format ----------------------------------------------------------

def test_a_vocabulary_that_does_not_fit_the_compact_format_stops_at_start(tmp_path, upstream, capsys):
    with pytest.raises(ConfigError, match=r"the model's vocabulary \(320 ids, mask 6, eos 7\) does not fit the "
                                          r"compact format of task 'sudoku' \(8 ids, mask 6, eos 7\)"):
        load_config(TrainConfig, CONFIG, ["model.overrides.vocab_size=320"]).validate()
    wide, _, _ = make_hf_dir(tmp_path / "wide", "llada", **{**SUDOKU_DIMS, "vocab": 320})
    out = tmp_path / "run"
    code = cli.main(["train", "--config", CONFIG, "--no-progress", "--output-dir", str(out), *TINY,
                     f"model.checkpoint={wide}"])
    assert code == 1
    _one_line(capsys.readouterr().err, "train", "(320 ids, mask 6, eos 7)", "(model.checkpoint)")
    assert not out.exists()


def test_chat_evaluation_without_a_tokenizer_is_one_line(upstream, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["eval", "--checkpoint", str(upstream), "--task", "sudoku", "--format", "chat",
                     "--output", str(out)]) == 1
    _one_line(capsys.readouterr().err, "eval", "--format chat needs a tokenizer", "--tokenizer DIR")
    assert not out.exists()


# ---- small frictions -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["eval", "--checkpoint", "{missing}", "--task", "sudoku"],
    ["sample", "--checkpoint", "{missing}", "--prompt-ids", "1,2", "--gen-length", "4", "--steps", "4"],
    ["export", "--checkpoint", "{missing}", "--out", "{tmp}/out"],
    ["export", "--run", "{missing}", "--out", "{tmp}/out"],
    ["convert", "--hf-dir", "{missing}", "--out", "{tmp}/out"],
], ids=["eval", "sample", "export-checkpoint", "export-run", "convert"])
def test_a_nonexistent_input_is_called_nonexistent(tmp_path, capsys, argv):
    missing = str(tmp_path / "no_such_ckpt")
    code = cli.main([a.format(missing=missing, tmp=tmp_path) for a in argv])
    assert code == 1
    flag = argv[argv.index("{missing}") - 1]
    _one_line(capsys.readouterr().err, argv[0], f"{flag} {missing}: no such file or directory")
    assert not (tmp_path / "out").exists()


def test_an_existing_output_names_overwrite_and_dtypes_have_one_spelling(upstream, tmp_path, capsys):
    out = tmp_path / "ck"
    out.mkdir()
    assert cli.main(["convert", "--hf-dir", str(upstream), "--out", str(out), "--dtype", "float32"]) == 1
    _one_line(capsys.readouterr().err, "convert", f"--out {out} already exists", "pass --overwrite")
    # bf16 | fp16 | fp32 everywhere, the NumPy names as aliases; a wrong one lists them
    for command, extra in [("convert", ["--hf-dir", "x", "--out", "y"]), ("export", ["--checkpoint", "x", "--out", "y"]),
                           ("sample", ["--checkpoint", "x", "--prompt-ids", "1", "--gen-length", "4", "--steps", "4"])]:
        parser = cli.build_parser(command)
        assert parser.parse_args([command, *extra, "--dtype", "bfloat16"]).dtype == "bf16"
        assert parser.parse_args([command, *extra, "--dtype", "fp32"]).dtype == "fp32"
        with pytest.raises(SystemExit):
            parser.parse_args([command, *extra, "--dtype", "int8"])
        assert "expected one of bf16" in capsys.readouterr().err
    assert cli.build_parser("export").parse_args(["export", "--checkpoint", "x", "--out", "y", "--dtype",
                                                  "float16"]).dtype == "fp16"


def test_switching_the_objective_says_how(tmp_path, capsys):
    code = cli.main(["train", "--config", CONFIG, "--no-progress", "--output-dir", str(tmp_path / "run"),
                     "objective.name=spg"])
    assert code == 1
    _one_line(capsys.readouterr().err, "train", "objective 'spg' has no setting 'beta'",
              "replace the whole section: 'objective={name: spg}'")
    assert load_config(TrainConfig, CONFIG, ["objective={name: spg}"]).validate().objective.name == "spg"


def test_a_short_smoke_run_of_the_default_shortens_the_warmup():
    """The default warms up over 10 steps with a cosine decay: a 2-step run validates, warms up over 1 step
    (peak rate at step 1, as optax's warm-up cosine with 1 warm-up step of 2) and says so in one line."""
    from gdsd_jax.rl.trainer import learning_rate, warmup_note

    cfg = load_config(TrainConfig, CONFIG, ["rl.total_steps=2"]).validate()
    lr = cfg.optim.lr
    assert [float(learning_rate(cfg.optim, s, 2)) for s in (0, 1)] == pytest.approx([0.0, lr], rel=1e-6)
    assert warmup_note(cfg.optim, 2) == ("optim.warmup_steps=10 is not shorter than rl.total_steps=2: warming up "
                                         "over 1 step(s) instead")
    full = load_config(TrainConfig, CONFIG, []).validate()
    assert warmup_note(full.optim, full.rl.total_steps) is None
    # the full run's schedule is unchanged: the half-cosine after 10 warm-up steps, in closed form
    t = 200
    want = 0.5 * lr * (1 + np.cos(np.pi * (t - 10) / (full.rl.total_steps - 10)))
    assert float(learning_rate(full.optim, t, full.rl.total_steps)) == pytest.approx(want, rel=1e-5)


# ---- the export's model code ----------------------------------------------------------------------

def test_export_warns_in_one_line_when_the_source_carried_no_model_code(upstream, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert cli.main(["convert", "--hf-dir", str(upstream), "--out", str(ck), "--no-progress"]) == 0
    out = tmp_path / "hf"
    assert cli.main(["export", "--checkpoint", str(ck), "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("gdsd-jax export: warning: ") and "\n" not in err
    assert "configuration_llada.py, modeling_llada.py" in err and "trust_remote_code=True" in err
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_llada.LLaDAModelLM"

    with_code = tmp_path / "with_code"
    with_code.mkdir()
    for f in upstream.iterdir():
        (with_code / f.name).write_bytes(f.read_bytes())
    for name in ("configuration_llada.py", "modeling_llada.py"):
        (with_code / name).write_text("# model code\n")
    ck2, out2 = tmp_path / "ck2", tmp_path / "hf2"
    assert cli.main(["convert", "--hf-dir", str(with_code), "--out", str(ck2), "--no-progress"]) == 0
    assert cli.main(["export", "--checkpoint", str(ck2), "--out", str(out2), "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert (out2 / "modeling_llada.py").read_text() == "# model code\n"
