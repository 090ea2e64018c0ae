"""The user's path end to end: upstream checkpoint -> convert -> RL -> export -> PyTorch ``transformers``.

A tiny upstream model (LLaDA = ``LlamaForCausalLM`` under LLaDA tensor names, Dream = ``Qwen2ForCausalLM``,
the layouts of ``test_parity_torch.py``, vocabulary 8 so that the 4x4 Sudoku rollouts of a random model
earn different rewards and the policy moves) is converted with ``--dtype fp32``, trained for two GDSD steps
(with LoRA, or full fine-tuning), exported with ``gdsd-jax export --run``, and read back by
``transformers``. Its logits must equal the trained policy's as the trainer computes it (the base with the
unmerged adapters, or the trained weights, restored from the run's train state), in fp32.

The Dream case walks the README's exact path: the upstream directory carries its model code (a
``configuration_dream.py`` / ``modeling_dream.py`` pair, here subclasses of transformers' Qwen2 classes, which
Dream's tensor names match), ``gdsd-jax train`` runs the embedded default config with only
``model.checkpoint`` and the run's size set, and the export loads with ``AutoModel.from_pretrained(...,
trust_remote_code=True)``. The LLaDA case has no model code (its names are not Llama's): the export says so in
one warning line and is read with a stock Llama under renamed tensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch", reason="PyTorch parity references need torch (not installed on this Python)")
transformers = pytest.importorskip("transformers")
from helpers_hf import dream_config, llada_config  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from gdsd_jax.cli import main as cli  # noqa: E402

V, D, LAYERS, HEADS, MLP, MASK, EOS = 8, 32, 2, 2, 48, 6, 7
TOL = 1e-4

_LLADA_TO_LLAMA = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
}


def _llama_name(k: str) -> str:
    """LLaDA tensor name -> Llama (the upstream LLaDA code's blocks are Llama blocks)."""
    top = {"model.transformer.wte.weight": "model.embed_tokens.weight", "model.transformer.ln_f.weight":
           "model.norm.weight", "model.transformer.ff_out.weight": "lm_head.weight"}
    if k in top:
        return top[k]
    _, _, _, i, module, param = k.split(".")       # model.transformer.blocks.{i}.{module}.{param}
    return f"model.layers.{i}.{_LLADA_TO_LLAMA[module]}.{param}"


def _llada_name(k: str) -> str:
    inverse = {_llama_name(n): n for n in (
        ["model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"]
        + [f"model.transformer.blocks.{i}.{m}.weight" for i in range(LAYERS) for m in _LLADA_TO_LLAMA])}
    return inverse[k]


def _torch_model(family: str, config: dict):
    """An fp32 ``transformers`` model with the dimensions of an upstream ``config.json``."""
    if family == "llada":
        cfg = transformers.LlamaConfig(
            vocab_size=config["embedding_size"], hidden_size=config["d_model"],
            intermediate_size=config["mlp_hidden_size"], num_hidden_layers=config["n_layers"],
            num_attention_heads=config["n_heads"], num_key_value_heads=config["n_kv_heads"],
            rms_norm_eps=config["rms_norm_eps"], rope_theta=config["rope_theta"], attention_bias=False,
            mlp_bias=False, hidden_act="silu", tie_word_embeddings=False, max_position_embeddings=1024)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.Qwen2Config(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["num_key_value_heads"],
        rms_norm_eps=config["rms_norm_eps"], rope_theta=config["rope_theta"], tie_word_embeddings=False,
        use_sliding_window=False, max_position_embeddings=1024)
    return transformers.Qwen2ForCausalLM(cfg).eval()


#: Remote code of the tiny Dream checkpoint: real modules that transformers imports from the model directory.
DREAM_CODE = {
    "configuration_dream.py": (
        "from transformers import Qwen2Config\n\n\n"
        "class DreamConfig(Qwen2Config):\n"
        "    model_type = \"Dream\"\n"),
    "modeling_dream.py": (
        "from transformers import Qwen2ForCausalLM\n\n"
        "from .configuration_dream import DreamConfig\n\n\n"
        "class DreamModel(Qwen2ForCausalLM):\n"
        "    config_class = DreamConfig\n"),
}


def _upstream_dir(tmp: Path, family: str) -> Path:
    conf = (llada_config(d=D, layers=LAYERS, heads=HEADS, kv=HEADS, mlp=MLP, vocab=V, mask=MASK, eos=EOS)
            if family == "llada" else
            dream_config(d=D, layers=LAYERS, heads=HEADS, kv=1, mlp=MLP, vocab=V, mask=MASK, eos=EOS))
    ref = _torch_model(family, conf)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_((1.0 + 0.1 * torch.randn(p.shape, generator=g)) if "norm" in name
                    else 0.3 * torch.randn(p.shape, generator=g))
    sd = {(_llada_name(k) if family == "llada" else k): v.contiguous() for k, v in ref.state_dict().items()}
    hf = tmp / f"{family}_hf"
    hf.mkdir()
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps(conf))
    if family == "dream":
        for name, code in DREAM_CODE.items():
            (hf / name).write_text(code)
    return hf


def _train(ck: Path, run: Path, lora: bool) -> None:
    """``gdsd-jax train`` with the embedded default config: the checkpoint and a tiny run's size only (the
    default's model.overrides are the tiny preset's and are not applied to the checkpoint)."""
    overrides = [
        f"model.checkpoint={ck}", "warm_start.mode=none", "rl.prompts_per_step=4",
        "rl.rollout_prompts_per_step=null", "rl.num_generations=4", "rl.micro_batch_size=16",
        "rl.num_iterations=1", "rl.total_steps=2", "optim.lr=0.01", "eval.every=0", "eval.max_examples=8",
        "eval.batch_size=8", "checkpoint.async_save=false", "tensorboard=false",
    ] + (["lora.enabled=true", "lora.rank=8", "lora.alpha=16"] if lora else [])
    assert cli(["train", "--no-progress", "--output-dir", str(run), *overrides]) == 0


def _trained_policy_logits(run: Path, tok: np.ndarray, lora: bool) -> tuple[np.ndarray, np.ndarray]:
    """(policy logits, base logits) in the upstream convention, from the run's last train state: the base
    weights with the adapters applied unmerged (as in training), or the fully trained weights."""
    from gdsd_jax.checkpoint.train_state import RunCheckpointer
    from gdsd_jax.loading import load_denoiser
    from gdsd_jax.models.denoiser import hidden_states, lm_head

    ck = RunCheckpointer(run / "checkpoints", async_save=False)
    state = ck.restore_on_one_device(ck.latest_step())
    meta = ck.read_meta()
    ck.close()
    base = load_denoiser(meta["config"]["model"]["checkpoint"])
    cfg = base.config
    assert cfg.param_dtype == cfg.compute_dtype == "float32"

    def raw(params, adapters=None, scale=1.0):
        h = hidden_states(params, cfg, tok, None, aligned=False, lora=adapters, lora_scale=scale)
        return np.asarray(lm_head(params, cfg, h))

    if lora:
        return raw(base.params(), state["trainable"], 16 / 8), raw(base.params())
    return raw(state["trainable"]), raw(base.params())


def _from_pretrained_with_remote_code(path: Path, modules: Path, monkeypatch):
    """``AutoModel.from_pretrained(path, trust_remote_code=True)``, with transformers' copy of the remote code
    under ``modules`` (not the user's cache)."""
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(modules))
    monkeypatch.setattr(sys, "path", list(sys.path))          # it appends the modules directory
    return transformers.AutoModel.from_pretrained(str(path), trust_remote_code=True).eval()


@pytest.mark.parametrize("family,lora", [("llada", True), ("dream", False)], ids=["llada-lora", "dream-full"])
def test_converted_trained_exported_model_loads_in_transformers(tmp_path, family, lora, capsys, monkeypatch):
    hf = _upstream_dir(tmp_path, family)
    ck = tmp_path / "ck"
    assert cli(["convert", "--hf-dir", str(hf), "--out", str(ck), "--dtype", "fp32", "--no-progress"]) == 0
    run = tmp_path / "run"
    _train(ck, run, lora)
    assert "model.overrides learned_positions (the preset's) not applied" in capsys.readouterr().out
    out = tmp_path / "exported"
    assert cli(["export", "--run", str(run), "--out", str(out), "--no-progress"]) == 0
    warning = capsys.readouterr().err
    conf = json.loads((out / "config.json").read_text())
    assert conf["torch_dtype"] == "float32"

    if family == "dream":                                     # the README's path: the model code came along
        assert "warning" not in warning
        assert {n: (out / n).read_text() for n in DREAM_CODE} == DREAM_CODE
        ref = _from_pretrained_with_remote_code(out, tmp_path / "modules", monkeypatch)
        assert type(ref).__name__ == "DreamModel" and type(ref).__module__.endswith("modeling_dream")
    else:
        assert "gdsd-jax export: warning:" in warning and "modeling_llada.py" in warning
        sd = load_file(str(out / "model.safetensors"))
        ref = _torch_model(family, conf)
        ref.load_state_dict({_llama_name(k): v for k, v in sd.items()}, strict=True)
    tok = np.random.default_rng(0).integers(0, V, size=(3, 24))
    bidirectional = torch.zeros((3, 1, 24, 24), dtype=torch.float32)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(tok), attention_mask=bidirectional).logits.float().numpy()
    got, base = _trained_policy_logits(run, tok, lora)
    np.testing.assert_allclose(want, got, rtol=0, atol=TOL)
    assert np.abs(got - base).max() > 1e-3            # the policy moved: the comparison is not of the base
