"""``gdsd-jax smoke``: tiny end-to-end check of the model pipeline, no downloads, no PyTorch.

1. builds a tiny random checkpoint in the exact upstream (Hugging Face) layout: ``config.json`` plus two
   safetensors shards that mix layers and ``model.safetensors.index.json``, written with NumPy;
2. converts it to a gdsd-jax params checkpoint (``gdsd-jax convert``);
3. loads it with ``gdsd_jax.load_denoiser`` and prints the logits of a small batch;
4. exports it back to the upstream layout and checks every tensor is bit-identical.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HELP = "tiny end-to-end check: build a tiny HF checkpoint, convert it, print logits"


def add_arguments(p) -> None:
    p.add_argument("--family", choices=["llada", "dream"], default="llada")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="stored dtype of the tiny weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="keep the files here (default: a temporary directory)")


def build_tiny_hf(path: Path, family: str = "llada", dtype: str = "bf16", seed: int = 0) -> Path:
    """Write a tiny random upstream-layout checkpoint (2 shards mixing layers + index) to ``path``."""
    import ml_dtypes
    import numpy as np

    from gdsd_jax.convert.hf_config import config_to_hf
    from gdsd_jax.convert.names import name_map
    from gdsd_jax.convert.safetensors_io import write_safetensors
    from gdsd_jax.models.config import tiny_dream, tiny_llada

    cfg = (tiny_llada if family == "llada" else tiny_dream)()
    np_dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bf16" else np.dtype(np.float32)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, spec in name_map(cfg).items():
        if spec.path[-1].endswith("norm"):
            x = 1.0 + 0.1 * rng.standard_normal(spec.hf_shape)
        else:
            x = 0.08 * rng.standard_normal(spec.hf_shape)
        tensors[name] = x.astype(np_dt)
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for k in range(2):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        part = {n: tensors[n] for n in names[k::2]}   # alternate tensors: every shard mixes layers
        write_safetensors(path / fname, part)
        weight_map.update({n: fname for n in part})
    total = sum(t.nbytes for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = config_to_hf(cfg, torch_dtype="bfloat16" if dtype == "bf16" else "float32")
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    return path


def run(args) -> int:
    import numpy as np

    import gdsd_jax
    from gdsd_jax.convert import convert_checkpoint, export_checkpoint
    from gdsd_jax.convert.hf_checkpoint import HFCheckpoint
    from gdsd_jax.convert.safetensors_io import TensorReader

    with tempfile.TemporaryDirectory(prefix="gdsd-smoke-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        hf_dir = build_tiny_hf(work / f"hf-{args.family}", args.family, args.dtype, args.seed)
        print(f"smoke: wrote tiny {args.family} checkpoint in the upstream layout to {hf_dir}")
        ckpt = convert_checkpoint(hf_dir, work / f"gdsd-{args.family}", overwrite=True, progress=False)
        print(f"smoke: converted to {ckpt}")
        model = gdsd_jax.load_denoiser(ckpt, compute_dtype="float32")
        cfg = model.config
        rng = np.random.default_rng(args.seed)
        tokens = rng.integers(0, cfg.mask_token_id, size=(2, 16))
        tokens[:, 8:] = cfg.mask_token_id
        mask = np.ones_like(tokens)
        mask[1, :3] = 0   # left padding on the second row
        logits = np.asarray(model(tokens, attention_mask=mask))
        print(f"smoke: {cfg.family} model, {model.num_params():,} parameters; logits shape {logits.shape} "
              f"dtype {logits.dtype}")
        print(f"smoke: logits[0, 8, :5] = {np.array2string(logits[0, 8, :5], precision=4)}")
        print(f"smoke: argmax at masked positions, row 0: {logits[0, 8:].argmax(-1).tolist()}")
        if not np.isfinite(logits).all():
            print("smoke: FAILED: non-finite logits", file=sys.stderr)
            return 1
        out = export_checkpoint(ckpt, work / f"export-{args.family}", max_shard_size="40KB", overwrite=True,
                                progress=False)
        src, dst = HFCheckpoint(hf_dir), HFCheckpoint(out)
        with TensorReader(src.tensors) as a, TensorReader(dst.tensors) as b:
            same = set(src.tensors) == set(dst.tensors) and all(
                np.array_equal(a.read(n).view(np.uint8), b.read(n).view(np.uint8)) for n in src.tensors)
        print(f"smoke: exported to {out}: {len(dst.tensors)} tensors, "
              f"{'bit-identical to the original' if same else 'DIFFERENT from the original'}")
        return 0 if same else 1
