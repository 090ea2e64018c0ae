"""Upstream ``config.json`` <-> :class:`~gdsd_jax.models.config.DenoiserConfig`.

* LLaDA (``model_type: "llada"``, remote code ``configuration_llada.py`` / ``modeling_llada.py``): fields
  ``d_model, n_layers, n_heads, n_kv_heads, mlp_hidden_size, embedding_size, rope_theta, rms_norm_eps,
  mask_token_id, eos_token_id, pad_token_id, max_sequence_length``.
* Dream (``model_type: "Dream"``, remote code ``configuration_dream.py`` / ``modeling_dream.py``): the Qwen2
  fields ``hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size,
  vocab_size, rope_theta, rms_norm_eps`` plus ``mask_token_id``.

Only the architecture both families actually use is accepted (SwiGLU/SiLU, RMSNorm, RoPE without
scaling, untied head, LLaDA without biases, no sliding window); anything else is rejected with the field
name rather than silently converted into a different network.

Decision (Dream ``max_seq_len``): upstream ``max_position_embeddings`` is 131072 (inherited from Qwen2.5),
while the Dream README states a 2048-token context; the config's ``max_seq_len`` is therefore
``min(max_position_embeddings, 2048)``. Export writes ``max_position_embeddings`` back unchanged when the
original ``config.json`` is known, else 131072.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gdsd_jax.convert.safetensors_io import CheckpointFormatError
from gdsd_jax.models.config import FAMILIES, DenoiserConfig

DREAM_CONTEXT = 2048

_MODEL_TYPES = {"llada": "llada", "dream": "dream"}

LLADA_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModel": "modeling_llada.LLaDAModelLM",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
}
DREAM_AUTO_MAP = {
    "AutoConfig": "configuration_dream.DreamConfig",
    "AutoModel": "modeling_dream.DreamModel",
}

_TORCH_DTYPES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16", "bf16": "bfloat16",
                 "fp32": "float32", "float": "float32", "half": "float16"}


def read_config_json(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: not found; a Hugging Face model directory needs config.json")
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{path}: corrupt config.json (not valid JSON: {e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointFormatError(f"{path}: corrupt config.json (expected a JSON object)")
    return cfg


def infer_family(hf_config: Mapping[str, Any], family: str | None = None) -> str:
    """The family from ``model_type`` ("llada" / "Dream"), checked against an explicit ``family``."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    mt = hf_config.get("model_type")
    known = _MODEL_TYPES.get(str(mt).lower()) if mt is not None else None
    if family is None:
        if known is None:
            raise ValueError(f"config.json: unknown model_type {mt!r}; expected 'llada' (LLaDA) or 'Dream' "
                             f"(Dream), or pass the family explicitly (--family {{llada,dream}})")
        return known
    if known is not None and known != family:
        raise ValueError(f"config.json says model_type {mt!r} (family {known!r}) but family {family!r} was "
                         f"requested")
    return family


def checkpoint_dtype(hf_config: Mapping[str, Any]) -> str | None:
    """``torch_dtype`` / ``dtype`` of config.json as a canonical name (None when absent)."""
    for key in ("torch_dtype", "dtype"):
        v = hf_config.get(key)
        if isinstance(v, str):
            v = v.removeprefix("torch.")
            if v not in _TORCH_DTYPES:
                raise ValueError(f"config.json: {key}={hf_config[key]!r}; expected bfloat16, float16 or float32")
            return _TORCH_DTYPES[v]
    return None


_MISSING = object()


def _field(c: Mapping[str, Any], name: str, family: str, default: Any = _MISSING, kind: type = int):
    """``config.json[name]`` as ``kind`` (``int`` or ``float``); ``default`` when the key is absent.

    A key that is present but null, or not a number, is an error naming the field: a null id (e.g. a config
    written for a model without an EOS token) must not fall back to another model's value.
    """
    if name not in c and default is not _MISSING:
        return default
    v = c.get(name)
    if v is None:
        state = "missing" if name not in c else "null"
        raise ValueError(f"config.json: field {name!r} is {state}; it is required for a {family} model")
    ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise ValueError(f"config.json: {name}={v!r}; expected {'an integer' if kind is int else 'a number'} "
                         f"(a {family} model)")
    return kind(v)


def _require(c: Mapping[str, Any], name: str, allowed, family: str, default=None):
    v = c.get(name, default)
    if v not in allowed:
        raise ValueError(f"config.json: {name}={v!r} is not supported for {family} "
                         f"(expected {' or '.join(repr(a) for a in allowed)})")


def config_from_hf(hf_config: Mapping[str, Any], family: str | None = None, *,
                   param_dtype: str = "float32", compute_dtype: str = "bfloat16") -> DenoiserConfig:
    """Build the :class:`DenoiserConfig` of an upstream ``config.json`` dict."""
    fam = infer_family(hf_config, family)
    c = hf_config
    common = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
    if fam == "llada":
        for name, allowed, default in (
                ("include_bias", (False,), False), ("include_qkv_bias", (False, None), False),
                ("weight_tying", (False,), False), ("block_type", ("llama",), "llama"),
                ("activation_type", ("silu", "swiglu"), "silu"), ("layer_norm_type", ("rms",), "rms"),
                ("rope", (True,), True), ("alibi", (False,), False), ("attention_layer_norm", (False,), False),
                ("scale_logits", (False,), False), ("input_emb_norm", (False,), False),
                ("block_group_size", (1,), 1), ("layer_norm_with_affine", (True,), True),
                ("bias_for_layer_norm", (False, None), False)):
            _require(c, name, allowed, "LLaDA", default)
        d = _field(c, "d_model", "LLaDA")
        heads = _field(c, "n_heads", "LLaDA")
        kv = _field(c, "n_kv_heads", "LLaDA", None)
        if kv is None:
            kv = 1 if c.get("multi_query_attention") else heads
        mlp = _field(c, "mlp_hidden_size", "LLaDA", None)
        if mlp is None:
            mlp = _field(c, "mlp_ratio", "LLaDA") * d
        vocab = _field(c, "embedding_size", "LLaDA", None) or _field(c, "vocab_size", "LLaDA")
        if d % heads:
            raise ValueError(f"config.json: d_model={d} is not divisible by n_heads={heads}")
        eos = _field(c, "eos_token_id", "LLaDA", 126081)
        return DenoiserConfig(
            family="llada", vocab_size=vocab, hidden_size=d, num_layers=_field(c, "n_layers", "LLaDA"),
            num_heads=heads, num_kv_heads=kv, head_dim=d // heads, mlp_dim=mlp,
            rope_theta=_field(c, "rope_theta", "LLaDA", 10000.0, float),
            rms_eps=_field(c, "rms_norm_eps", "LLaDA", 1e-5, float), qkv_bias=False,
            mask_token_id=_field(c, "mask_token_id", "LLaDA", 126336), eos_token_id=eos,
            pad_token_id=_pad_id(c, eos, "LLaDA"), max_seq_len=_field(c, "max_sequence_length", "LLaDA", 4096), **common)
    # dream
    for name, allowed, default in (
            ("tie_word_embeddings", (False,), False), ("hidden_act", ("silu",), "silu"),
            ("use_sliding_window", (False,), False), ("rope_scaling", (None,), None),
            ("use_mrope", (False,), False)):
        _require(c, name, allowed, "Dream", default)
    d = _field(c, "hidden_size", "Dream")
    heads = _field(c, "num_attention_heads", "Dream")
    kv = _field(c, "num_key_value_heads", "Dream", None) or heads
    if d % heads:
        raise ValueError(f"config.json: hidden_size={d} is not divisible by num_attention_heads={heads}")
    if c.get("head_dim") not in (None, d // heads):
        raise ValueError(f"config.json: head_dim={c['head_dim']} but Dream uses hidden_size // "
                         f"num_attention_heads = {d // heads}")
    eos = _field(c, "eos_token_id", "Dream", 151643)
    return DenoiserConfig(
        family="dream", vocab_size=_field(c, "vocab_size", "Dream"), hidden_size=d,
        num_layers=_field(c, "num_hidden_layers", "Dream"), num_heads=heads, num_kv_heads=kv,
        head_dim=d // heads, mlp_dim=_field(c, "intermediate_size", "Dream"),
        rope_theta=_field(c, "rope_theta", "Dream", 10000.0, float),
        rms_eps=_field(c, "rms_norm_eps", "Dream", 1e-6, float), qkv_bias=True,
        mask_token_id=_field(c, "mask_token_id", "Dream"), eos_token_id=eos, pad_token_id=_pad_id(c, eos, "Dream"),
        max_seq_len=min(_field(c, "max_position_embeddings", "Dream", 131072), DREAM_CONTEXT), **common)


def _pad_id(c: Mapping[str, Any], eos: int, family: str) -> int:
    """``pad_token_id``, or the EOS id when the config has none (null is common here and means "use EOS")."""
    return eos if c.get("pad_token_id") is None else _field(c, "pad_token_id", family)


def config_to_hf(cfg: DenoiserConfig, original: Mapping[str, Any] | None = None,
                 torch_dtype: str = "bfloat16") -> dict:
    """Upstream ``config.json`` for ``cfg``.

    With ``original`` (the ``config.json`` the checkpoint was converted from) every field it had is kept
    and only the architecture fields are rewritten from ``cfg``; otherwise the full upstream field set
    (values of the released LLaDA-8B / Dream-v0-7B configs) is synthesised. A model the upstream layout
    cannot hold raises ``ValueError`` saying why (one line).
    """
    if cfg.learned_positions:
        raise ValueError(f"this {cfg.family} model has learned absolute position embeddings "
                         f"(learned_positions=true), which the upstream LLaDA / Dream layout has no tensor for "
                         f"(it uses RoPE only); keep it as a gdsd-jax params checkpoint (export --format params)")
    if cfg.family == "llada":
        if cfg.hidden_size != cfg.num_heads * cfg.head_dim:
            raise ValueError(f"LLaDA requires head_dim = d_model / n_heads; got hidden_size={cfg.hidden_size}, "
                             f"num_heads={cfg.num_heads}, head_dim={cfg.head_dim}")
        base = {
            "architectures": ["LLaDAModelLM"], "auto_map": dict(LLADA_AUTO_MAP), "model_type": "llada",
            "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "attention_dropout": 0.0,
            "attention_layer_norm": False, "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False,
            "block_group_size": 1, "block_type": "llama", "embedding_dropout": 0.0, "flash_attention": False,
            "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
            "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
            "layer_norm_with_affine": True, "mlp_ratio": 4, "multi_query_attention": None,
            "precision": "amp_bf16", "residual_dropout": 0.0, "rope": True, "rope_full_precision": True,
            "scale_logits": False, "use_cache": False, "weight_tying": False,
        }
        arch = {
            "d_model": cfg.hidden_size, "n_layers": cfg.num_layers, "n_heads": cfg.num_heads,
            "n_kv_heads": cfg.num_kv_heads, "mlp_hidden_size": cfg.mlp_dim, "embedding_size": cfg.vocab_size,
            "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps, "mask_token_id": cfg.mask_token_id,
            "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
            "max_sequence_length": cfg.max_seq_len,
        }
        out = dict(original) if original else {**base, "vocab_size": cfg.vocab_size}
        if "vocab_size" not in out or int(out["vocab_size"]) > cfg.vocab_size:
            out["vocab_size"] = cfg.vocab_size
    elif cfg.family == "dream":
        if cfg.hidden_size != cfg.num_heads * cfg.head_dim:
            raise ValueError(f"Dream requires head_dim = hidden_size / num_attention_heads; got "
                             f"hidden_size={cfg.hidden_size}, num_heads={cfg.num_heads}, head_dim={cfg.head_dim}")
        base = {
            "architectures": ["DreamModel"], "auto_map": dict(DREAM_AUTO_MAP), "model_type": "Dream",
            "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
            "max_position_embeddings": max(131072, cfg.max_seq_len), "max_window_layers": cfg.num_layers,
            "rope_scaling": None, "sliding_window": None, "tie_word_embeddings": False, "use_cache": True,
            "use_mrope": False, "use_sliding_window": False, "bos_token_id": cfg.eos_token_id,
        }
        arch = {
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
            "intermediate_size": cfg.mlp_dim, "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.rms_eps, "mask_token_id": cfg.mask_token_id, "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id,
        }
        out = dict(original) if original else dict(base)
    else:
        raise ValueError(f"unknown model family {cfg.family!r}; expected one of {FAMILIES}")
    out.update(arch)
    out["torch_dtype"] = torch_dtype
    if "dtype" in out:
        out["dtype"] = torch_dtype
    return out
