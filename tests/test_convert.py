"""HF <-> params-checkpoint conversion: name maps of the real models, config reading, layout transforms,
bit-exact round trips, restore onto a mesh, clear errors for bad input, atomic output, and the commands."""

from __future__ import annotations

import json
import os
import struct

import jax
import numpy as np
import pytest
from helpers_hf import BF16, dream_config, hf_shapes, llada_config, make_hf_dir, read_all, write_hf_dir

import gdsd_jax
from gdsd_jax.checkpoint.params_io import is_params_checkpoint, read_config, restore_params, save_params
from gdsd_jax.cli import main as cli_main
from gdsd_jax.convert import (
    CheckpointFormatError,
    config_from_hf,
    config_to_hf,
    convert_checkpoint,
    export_checkpoint,
    load_hf_params,
    name_map,
    parse_size,
)
from gdsd_jax.convert.safetensors_io import TensorReader
from gdsd_jax.distributed.mesh import make_mesh
from gdsd_jax.models.config import dream_7b, llada_8b, tiny_dream, tiny_llada
from gdsd_jax.models.denoiser import param_shardings

# ---- name maps and configs of the released models -----------------------------------------------

LLADA_8B = dict(d=4096, layers=32, heads=32, kv=32, mlp=12288, vocab=126464)
DREAM_7B = dict(d=3584, layers=28, heads=28, kv=4, mlp=18944, vocab=152064)


@pytest.mark.parametrize("cfg_fn,family,dims,count,params", [
    (llada_8b, "llada", LLADA_8B, 291, 8_015_581_184),
    (dream_7b, "dream", DREAM_7B, 339, 7_615_616_512)])
def test_name_map_covers_released_checkpoints(cfg_fn, family, dims, count, params):
    expected = hf_shapes(family, **dims)
    assert len(expected) == count and sum(int(np.prod(s)) for s in expected.values()) == params
    m = name_map(cfg_fn())
    assert set(m) == set(expected)
    for name, spec in m.items():
        assert spec.hf_shape == expected[name], name
        assert int(np.prod(spec.shape)) == int(np.prod(expected[name]))


def test_llada_ff_out_clash():
    m = name_map(llada_8b())
    assert m["model.transformer.ff_out.weight"].path == ("lm_head",)
    assert m["model.transformer.blocks.3.ff_out.weight"].path == ("layers", "down")
    assert m["model.transformer.blocks.3.ff_out.weight"].layer == 3
    assert m["model.transformer.blocks.0.ff_proj.weight"].path == ("layers", "gate")


def test_released_configs_give_the_presets():
    llada = llada_config(d=4096, layers=32, heads=32, kv=32, mlp=12288, vocab=126464, mask=126336, eos=126081,
                         theta=500000.0, eps=1e-5, max_len=4096, torch_dtype="bfloat16")
    dream = dream_config(d=3584, layers=28, heads=28, kv=4, mlp=18944, vocab=152064, mask=151666, eos=151643,
                         theta=1000000.0, eps=1e-6, max_pos=131072, torch_dtype="bfloat16")
    assert config_from_hf(llada) == llada_8b()
    assert config_from_hf(dream) == dream_7b()
    # and back: the architecture fields survive a synthesised config.json
    for cfg in (llada_8b(), dream_7b()):
        hf = config_to_hf(cfg)
        assert config_from_hf(hf) == cfg
    assert config_to_hf(llada_8b())["model_type"] == "llada"
    assert config_to_hf(llada_8b())["auto_map"]["AutoModel"] == "modeling_llada.LLaDAModelLM"
    assert config_to_hf(dream_7b())["model_type"] == "Dream"
    assert config_to_hf(dream_7b())["auto_map"]["AutoModel"] == "modeling_dream.DreamModel"


def test_family_inference():
    assert config_from_hf(llada_config()).family == "llada"
    assert config_from_hf(dream_config()).family == "dream"
    assert config_from_hf({**dream_config(), "model_type": "dream"}).family == "dream"
    with pytest.raises(ValueError, match="model_type 'llada'.*family 'dream'"):
        config_from_hf(llada_config(), "dream")
    with pytest.raises(ValueError, match="unknown model_type 'llama'.*--family"):
        config_from_hf({**llada_config(), "model_type": "llama"})
    with pytest.raises(ValueError, match="unknown model family 'gpt'"):
        config_from_hf(llada_config(), "gpt")
    with pytest.raises(ValueError, match="field 'd_model' is missing"):
        config_from_hf({k: v for k, v in llada_config().items() if k != "d_model"})
    with pytest.raises(ValueError, match="weight_tying=True is not supported"):
        config_from_hf({**llada_config(), "weight_tying": True})


def test_transforms_follow_torch_linear_semantics():
    """Our einsums on converted kernels compute torch's ``x @ W.T`` with head split ``h * Dh + d``."""
    cfg = tiny_dream()
    m = name_map(cfg)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, cfg.hidden_size))
    wq = rng.standard_normal(m["model.layers.0.self_attn.q_proj.weight"].hf_shape)
    q = np.einsum("bld,dhk->blhk", x, m["model.layers.0.self_attn.q_proj.weight"].to_ours(wq))
    np.testing.assert_allclose(q, (x @ wq.T).reshape(2, 3, cfg.num_heads, cfg.head_dim), atol=1e-12)
    bq = rng.standard_normal(m["model.layers.0.self_attn.q_proj.bias"].hf_shape)
    np.testing.assert_array_equal(m["model.layers.0.self_attn.q_proj.bias"].to_ours(bq)[1], bq[16:32])
    a = rng.standard_normal((2, 3, cfg.num_heads, cfg.head_dim))
    wo = rng.standard_normal(m["model.layers.0.self_attn.o_proj.weight"].hf_shape)
    o = np.einsum("blhk,hkd->bld", a, m["model.layers.0.self_attn.o_proj.weight"].to_ours(wo))
    np.testing.assert_allclose(o, a.reshape(2, 3, -1) @ wo.T, atol=1e-12)
    wd = rng.standard_normal(m["model.layers.1.mlp.down_proj.weight"].hf_shape)
    f = rng.standard_normal((2, 3, cfg.mlp_dim))
    np.testing.assert_allclose(f @ m["model.layers.1.mlp.down_proj.weight"].to_ours(wd), f @ wd.T, atol=1e-12)
    for spec in list(m.values())[:14]:
        w = rng.standard_normal(spec.hf_shape)
        np.testing.assert_array_equal(spec.to_hf(spec.to_ours(w)), w)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_loaded_leaves_are_stacked_transposed_hf_tensors(tmp_path, family):
    hf, conf, t = make_hf_dir(tmp_path / "hf", family, shards=3, seed=2)
    params, cfg, _ = load_hf_params(hf)
    assert cfg.family == family and cfg.param_dtype == "float32"
    p = "model.transformer." if family == "llada" else "model."
    emb = p + ("wte.weight" if family == "llada" else "embed_tokens.weight")
    np.testing.assert_array_equal(params["embed"], t[emb])
    head = "model.transformer.ff_out.weight" if family == "llada" else "lm_head.weight"
    np.testing.assert_array_equal(params["lm_head"], t[head].T)
    k = ("model.transformer.blocks.{}.k_proj.weight" if family == "llada"
         else "model.layers.{}.self_attn.k_proj.weight")
    for i in range(cfg.num_layers):
        np.testing.assert_array_equal(params["layers"]["k"][i],
                                      t[k.format(i)].T.reshape(cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim))
    down = "model.transformer.blocks.1.ff_out.weight" if family == "llada" else "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(params["layers"]["down"][1], t[down].T)


@pytest.mark.parametrize("src,dst", [(BF16, BF16), (BF16, np.float32), (np.float32, BF16), (np.float32, np.float32)])
def test_tiled_transposed_copy(src, dst):
    from gdsd_jax.convert.safetensors_io import copy_transposed

    x = np.random.default_rng(0).standard_normal((600, 333)).astype(src)   # several partial 256-tiles
    x[0, 0], x[1, 0], x[2, 0] = np.nan, -np.inf, -0.0
    out = np.empty((333, 600), dst)
    copy_transposed(out, x)
    want = x.T.astype(dst)
    assert out.tobytes() == np.ascontiguousarray(want).tobytes()


def test_bf16_checkpoint_read_as_fp32(tmp_path):
    hf, _, t = make_hf_dir(tmp_path / "hf", "llada", dtype=BF16, seed=9, d=512, heads=4, kv=4, mlp=768)
    params, cfg, _ = load_hf_params(hf, dtype="fp32")
    assert cfg.param_dtype == "float32" and params["layers"]["gate"].dtype == np.float32
    np.testing.assert_array_equal(params["layers"]["gate"][1],
                                  t["model.transformer.blocks.1.ff_proj.weight"].astype(np.float32).T)
    np.testing.assert_array_equal(params["layers"]["q"][0],
                                  t["model.transformer.blocks.0.q_proj.weight"].astype(np.float32).T.reshape(512, 4, 128))
    np.testing.assert_array_equal(params["embed"], t["model.transformer.wte.weight"].astype(np.float32))


# ---- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("family,dtype,convert_dtype", [
    ("llada", BF16, None), ("dream", BF16, None), ("llada", np.float32, None), ("dream", BF16, "fp32")])
def test_round_trip_bit_exact(tmp_path, family, dtype, convert_dtype):
    hf, conf, t = make_hf_dir(tmp_path / "hf", family, shards=3, dtype=dtype, seed=3)
    (hf / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    ck = convert_checkpoint(hf, tmp_path / "ck", dtype=convert_dtype, progress=False)
    assert is_params_checkpoint(ck)
    assert read_config(ck).param_dtype == ("float32" if convert_dtype == "fp32" or dtype == np.float32
                                           else "bfloat16")
    out = export_checkpoint(ck, tmp_path / "out", max_shard_size="24KB", progress=False)
    back = read_all(out)
    assert set(back) == set(t)
    for name, want in t.items():
        got = back[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(f.name for f in out.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == files and len(files) > 1
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in t.values())
    biggest = max(a.nbytes for a in t.values())
    assert all(f.stat().st_size <= max(24_000, biggest) + 4096 for f in out.glob("*.safetensors"))
    assert json.loads((out / "config.json").read_text()) == conf        # original config restored as is
    assert (out / "tokenizer_config.json").is_file()                     # side files travel along


def test_export_single_file_and_synthesised_config(tmp_path):
    """A checkpoint saved by the trainer (no upstream config) exports a complete upstream config."""
    cfg = tiny_llada()
    rng = np.random.default_rng(4)
    from gdsd_jax.models.denoiser import param_shapes

    params = jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    save_params(tmp_path / "ck", params, cfg)
    out = export_checkpoint(tmp_path / "ck", tmp_path / "out", dtype="fp32", progress=False)
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors"]
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "llada" and conf["architectures"] == ["LLaDAModelLM"]
    assert conf["auto_map"]["AutoModelForCausalLM"] == "modeling_llada.LLaDAModelLM"
    assert conf["torch_dtype"] == "float32"
    back = read_all(out)
    np.testing.assert_array_equal(back["model.transformer.ff_out.weight"], params["lm_head"].T)
    np.testing.assert_array_equal(back["model.transformer.blocks.1.attn_out.weight"],
                                  params["layers"]["o"][1].reshape(-1, cfg.hidden_size).T)
    reloaded, cfg2, _ = load_hf_params(out)
    assert cfg2.replace(compute_dtype=cfg.compute_dtype) == cfg
    for a, b in zip(jax.tree.leaves(reloaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_restore_onto_mesh_and_dtype_override(tmp_path):
    hf, conf, t = make_hf_dir(tmp_path / "hf", "dream", shards=2, dtype=BF16, seed=5)
    ck = convert_checkpoint(hf, tmp_path / "ck", progress=False)
    host, _, _ = load_hf_params(hf)
    mesh = make_mesh(2, 2, 2)
    params, cfg = restore_params(ck, mesh=mesh, dtype="fp32")
    assert cfg.param_dtype == "float32"
    want_shardings = param_shardings(cfg, mesh)
    for path, arr in jax.tree_util.tree_leaves_with_path(params):
        sh = want_shardings
        for k in path:
            sh = sh[k.key]
        assert arr.dtype == np.float32
        assert arr.sharding.is_equivalent_to(sh, arr.ndim)
    assert {s.data.shape for s in params["layers"]["gate"].addressable_shards} == {(2, 32, 48)}
    assert {s.data.shape for s in params["embed"].addressable_shards} == {(128, 32)}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(host)):
        np.testing.assert_array_equal(np.asarray(a), b.astype(np.float32))   # bf16 -> fp32 is exact
    model = gdsd_jax.load_denoiser(ck, mesh=mesh)
    assert model.config.param_dtype == "bfloat16" and model.embed[...].sharding.mesh.shape == mesh.shape


def test_save_params_from_sharded_arrays_overwrites_atomically(tmp_path):
    cfg = tiny_llada()
    mesh = make_mesh(1, 4, 2)
    from gdsd_jax.models.denoiser import param_shapes

    rng = np.random.default_rng(0)
    host = jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))
    params = jax.device_put(host, param_shardings(cfg, mesh))
    save_params(tmp_path / "p", params, cfg)
    params2 = jax.device_put(jax.tree.map(lambda x: x + 1, host), param_shardings(cfg, mesh))
    save_params(tmp_path / "p", params2, cfg)                        # overwrite (trainer usage)
    got, cfg2 = restore_params(tmp_path / "p")
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(os.listdir(tmp_path)) == ["p"]                      # no temporary leftovers


def test_load_denoiser_detects_kind(tmp_path):
    hf, _, _ = make_hf_dir(tmp_path / "hf", "llada", seed=6)
    ck = convert_checkpoint(hf, tmp_path / "ck", progress=False)
    tok = np.arange(10)[None] % 200
    a = np.asarray(gdsd_jax.load_denoiser(hf, compute_dtype="float32")(tok))
    b = np.asarray(gdsd_jax.load_denoiser(ck, compute_dtype="float32")(tok))
    np.testing.assert_array_equal(a, b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither a gdsd-jax params checkpoint \(.*\) nor a Hugging Face"):
        gdsd_jax.load_denoiser(tmp_path / "empty")


# ---- bad input ----------------------------------------------------------------------------------

def _hf(tmp_path, family="llada", **kw):
    return make_hf_dir(tmp_path / "hf", family, **kw)


def _convert_fails(tmp_path, hf, match, exc=CheckpointFormatError, **kw):
    with pytest.raises(exc, match=match):
        convert_checkpoint(hf, tmp_path / "out", progress=False, **kw)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_error_missing_shard(tmp_path):
    hf, _, _ = _hf(tmp_path, shards=3)
    (hf / "model-00002-of-00003.safetensors").unlink()
    _convert_fails(tmp_path, hf, r"missing shard 'model-00002-of-00003.safetensors'.*lists \d+ tensor")


def test_error_unknown_tensor_name(tmp_path):
    hf, conf, t = _hf(tmp_path)
    t["model.transformer.blocks.0.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    write_hf_dir(hf, conf, t)
    _convert_fails(tmp_path, hf, r"unknown tensor name\(s\) 'model.transformer.blocks.0.extra_proj.weight'")


def test_error_other_family_names(tmp_path):
    hf, conf, t = _hf(tmp_path, "dream")
    (hf / "config.json").write_text(json.dumps({**llada_config(), "torch_dtype": "float32"}))
    _convert_fails(tmp_path, hf, "look like a dream checkpoint")


def test_error_missing_tensor(tmp_path):
    hf, conf, t = _hf(tmp_path, "dream")
    del t["model.layers.1.self_attn.v_proj.bias"]
    write_hf_dir(hf, conf, t)
    _convert_fails(tmp_path, hf, r"missing tensor\(s\) 'model.layers.1.self_attn.v_proj.bias'")


def test_error_shape_mismatch(tmp_path):
    hf, conf, t = _hf(tmp_path)
    t["model.transformer.blocks.1.up_proj.weight"] = np.zeros((95, 64), np.float32)
    write_hf_dir(hf, conf, t)
    _convert_fails(tmp_path, hf, r"'model.transformer.blocks.1.up_proj.weight' has shape \[95, 64\], "
                                 r"expected \[96, 64\]")


def test_error_dtype_mismatch(tmp_path):
    hf, conf, t = _hf(tmp_path, dtype=BF16)
    t["model.transformer.ln_f.weight"] = t["model.transformer.ln_f.weight"].astype(np.float32)
    write_hf_dir(hf, conf, t)
    _convert_fails(tmp_path, hf, r"'model.transformer.ln_f.weight' has dtype F32, expected BF16 "
                                 r"\(config.json torch_dtype=bfloat16\)")
    conf2 = {k: v for k, v in conf.items() if k != "torch_dtype"}
    write_hf_dir(hf, conf2, t)
    _convert_fails(tmp_path, hf, r"'model.transformer.ln_f.weight' has dtype F32, expected BF16")
    t["model.transformer.ln_f.weight"] = np.zeros(64, np.int32)
    write_hf_dir(hf, conf, t)
    _convert_fails(tmp_path, hf, "has dtype I32, expected a floating dtype")


def test_error_unknown_family(tmp_path):
    hf, conf, _ = _hf(tmp_path)
    _convert_fails(tmp_path, hf, "unknown model family 'gpt'", ValueError, family="gpt")
    (hf / "config.json").write_text(json.dumps({**conf, "model_type": "gpt2"}))
    _convert_fails(tmp_path, hf, "unknown model_type 'gpt2'", ValueError)


def test_error_corrupt_files(tmp_path):
    hf, conf, _ = _hf(tmp_path, shards=2)
    shard = hf / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])                                     # truncated download
    _convert_fails(tmp_path, hf, r"model-00001-of-00002.safetensors: tensor '.*': file is truncated")
    shard.write_bytes(struct.pack("<Q", 10**12) + data[8:])           # absurd header length
    _convert_fails(tmp_path, hf, "model-00001-of-00002.safetensors: corrupt safetensors file: header length")
    n = struct.unpack("<Q", data[:8])[0]
    shard.write_bytes(data[:8] + b"{not json" + b" " * (n - 9) + data[8 + n:])
    _convert_fails(tmp_path, hf, "model-00001-of-00002.safetensors: corrupt safetensors file: header is not valid")
    shard.write_bytes(data)
    (hf / "model.safetensors.index.json").write_text("{oops")
    _convert_fails(tmp_path, hf, "model.safetensors.index.json: corrupt index")
    (hf / "config.json").write_text("{oops")
    _convert_fails(tmp_path, hf, "config.json: corrupt config.json")


def test_error_no_weights_and_existing_output(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(llada_config()))
    _convert_fails(tmp_path, tmp_path / "hf", "no weights found; expected model.safetensors")
    hf, _, _ = make_hf_dir(tmp_path / "hf2", "llada")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_checkpoint(hf, tmp_path / "out", progress=False)


def test_failed_conversion_leaves_nothing_valid(tmp_path, monkeypatch):
    hf, _, _ = _hf(tmp_path, shards=2)
    good = convert_checkpoint(hf, tmp_path / "out", progress=False)
    before = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}
    calls = {"n": 0}
    real_read = TensorReader.read

    def flaky(self, name, out=None):
        calls["n"] += 1
        if calls["n"] == 12:                  # fail half-way, after several leaves were written
            raise OSError("disk went away")
        return real_read(self, name, out)

    monkeypatch.setattr(TensorReader, "read", flaky)
    with pytest.raises(OSError, match="disk went away"):
        convert_checkpoint(hf, tmp_path / "out", overwrite=True, progress=False)
    with pytest.raises(OSError, match="disk went away"):
        calls["n"] = 0
        convert_checkpoint(hf, tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]      # no hidden leftovers
    after = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}
    assert after == before and is_params_checkpoint(good)                   # old output untouched


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    assert parse_size("1.5MB") == 1_500_000
    with pytest.raises(ValueError, match="bad size"):
        parse_size("5 parsecs")


# ---- commands -----------------------------------------------------------------------------------

def test_convert_and_export_commands(tmp_path, capsys):
    hf, conf, t = make_hf_dir(tmp_path / "hf", "dream", shards=2, dtype=BF16, seed=8)
    assert cli_main(["convert", "--hf-dir", str(hf), "--out", str(tmp_path / "ck"), "--no-progress"]) == 0
    assert "dream, 2 layers" in capsys.readouterr().out
    assert cli_main(["export", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "ex"),
                     "--max-shard-size", "30KB", "--no-progress"]) == 0
    back = read_all(tmp_path / "ex")
    assert all(back[k].tobytes() == v.tobytes() for k, v in t.items()) and set(back) == set(t)
    assert cli_main(["convert", "--hf-dir", str(hf), "--out", str(tmp_path / "ck2"), "--family", "llada",
                     "--no-progress"]) == 1
    assert "model_type 'Dream' (family 'dream') but family 'llada'" in capsys.readouterr().err


def test_smoke_command(capsys):
    assert cli_main(["smoke"]) == 0
    out = capsys.readouterr().out
    assert "logits shape (2, 16, 256)" in out and "bit-identical to the original" in out


@pytest.mark.parametrize("family, field", [("llada", "eos_token_id"), ("llada", "mask_token_id"),
                                           ("llada", "d_model"), ("dream", "eos_token_id"),
                                           ("dream", "mask_token_id"), ("dream", "vocab_size")])
def test_a_null_or_missing_required_config_field_is_named(tmp_path, family, field):
    hf, conf, _ = _hf(tmp_path, family)
    (hf / "config.json").write_text(json.dumps({**conf, field: None}))
    _convert_fails(tmp_path, hf, rf"config.json: field '{field}' is null; it is required", exc=ValueError)
    if (family, field) in {("llada", "d_model"), ("dream", "mask_token_id"), ("dream", "vocab_size")}:   # no default
        (hf / "config.json").write_text(json.dumps({k: v for k, v in conf.items() if k != field}))
        _convert_fails(tmp_path, hf, rf"config.json: field '{field}' is missing", exc=ValueError)
    (hf / "config.json").write_text(json.dumps({**conf, field: "many"}))
    _convert_fails(tmp_path, hf, rf"config.json: {field}='many'; expected an integer", exc=ValueError)


def test_a_null_eos_through_the_command_is_one_line(tmp_path, capsys):
    hf, conf, _ = _hf(tmp_path)
    (hf / "config.json").write_text(json.dumps({**conf, "eos_token_id": None}))
    assert cli_main(["convert", "--hf-dir", str(hf), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gdsd-jax convert: error: config.json: field 'eos_token_id' is null; it is required for a LLaDA model"]


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_reported(tmp_path, value):
    hf, conf, t = _hf(tmp_path, "dream")
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    t["model.layers.1.mlp.up_proj.weight"][7, 1] = value
    write_hf_dir(hf, conf, t)
    _convert_fails(tmp_path, hf, r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' holds 2 "
                                 r"non-finite value\(s\) \(NaN or inf\)")
    with pytest.raises(CheckpointFormatError, match="non-finite"):
        gdsd_jax.load_denoiser(hf)


def test_overwrite_replaces_only_a_checkpoint(tmp_path):
    hf, _, _ = _hf(tmp_path)
    precious = tmp_path / "out"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=r"is not a gdsd-jax params checkpoint.*--overwrite replaces only"):
        convert_checkpoint(hf, precious, overwrite=True, progress=False)
    assert (precious / "thesis.tex").read_text() == "years of work"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a gdsd-jax params checkpoint"):
        convert_checkpoint(hf, a_file, overwrite=True, progress=False)
    ck = convert_checkpoint(hf, tmp_path / "ck", progress=False)          # a checkpoint is replaced
    assert convert_checkpoint(hf, ck, overwrite=True, progress=False) == ck
    (tmp_path / "empty").mkdir()                                         # and so is an empty directory
    convert_checkpoint(hf, tmp_path / "empty", overwrite=True, progress=False)
