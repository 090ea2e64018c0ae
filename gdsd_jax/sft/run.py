"""The SFT loop (masked-diffusion SFT on a task's training solutions) and the cached SFT warm start of RL."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import jax
import optax
from tqdm.auto import tqdm

from gdsd_jax.checkpoint.integrity import CheckpointIntegrityError
from gdsd_jax.checkpoint.params_io import restore_params, save_params
from gdsd_jax.config_io import ConfigError, to_dict
from gdsd_jax.distributed import multihost
from gdsd_jax.distributed.mesh import batch_sharding
from gdsd_jax.models.config import DenoiserConfig
from gdsd_jax.sft.trainer import make_sft_step
from gdsd_jax.training.config import TrainConfig
from gdsd_jax.training.evaluate import evaluate
from gdsd_jax.training.metrics import MetricsLogger, log
from gdsd_jax.training.setup import build_mesh, build_model, build_task_and_adapter, eval_examples, index_iterator


def run_sft(cfg: TrainConfig, *, mesh=None, model_cfg=None, params=None, output_dir: str | None = None,
            progress: bool = True) -> tuple[DenoiserConfig, dict, list[dict]]:
    """Masked-diffusion SFT on the task's training solutions; returns (model_cfg, params, history).

    Evaluates greedily every ``sft.eval_every`` steps and, with ``sft.stop_at_reward``, stops at the
    first evaluation reaching it (the deliberately imperfect warm start of the tiny default).
    """
    mesh = mesh or build_mesh(cfg)
    if model_cfg is None:
        model_cfg, params = build_model(cfg, mesh)
    task, adapter, _ = build_task_and_adapter(cfg, model_cfg)
    if not hasattr(adapter, "targets"):
        raise ConfigError("sft needs a task format with targets (task.format=compact)")
    train = list(task.examples("train"))
    test = eval_examples(task, cfg)
    scfg = cfg.eval_sampling_config()
    s = cfg.sft
    tx = optax.chain(optax.clip_by_global_norm(s.max_grad_norm),
                     optax.adamw(s.lr, b1=s.b1, b2=s.b2, weight_decay=s.weight_decay))
    opt_state = jax.jit(tx.init)(params)
    step_fn = make_sft_step(model_cfg, tx, s.min_t, mesh)
    it = index_iterator(len(train), s.batch_size, s.seed)
    key = jax.random.key(s.seed)
    history: list[dict] = []
    logger = MetricsLogger(output_dir, tensorboard=False, filename="sft_metrics.jsonl") if output_dir else None
    sh = batch_sharding(mesh, 2)

    def do_eval(step):
        res = evaluate(params, model_cfg, adapter, test, scfg, mesh, batch_size=cfg.eval.batch_size)
        rec = {"step": step, "test_reward": res.mean_reward, "test_accuracy": res.accuracy}
        history.append(rec)
        if logger:
            logger.log(step, {"test_reward": res.mean_reward, "test_accuracy": res.accuracy})
        return res

    bar = tqdm(range(1, s.steps + 1), desc="sft", disable=not progress or jax.process_index() != 0)
    t0 = time.perf_counter()
    for step in bar:
        examples = [train[i] for i in next(it)]           # this process's block of the global batch
        pids, pmask = adapter.encode(examples)
        targets = adapter.targets(examples, scfg.gen_length)
        params, opt_state, m = step_fn(params, opt_state, multihost.global_batch(pids, sh),
                                       multihost.global_batch(pmask, sh), multihost.global_batch(targets, sh),
                                       jax.random.fold_in(key, step))
        if s.eval_every and step % s.eval_every == 0:
            res = do_eval(step)
            bar.set_postfix(loss=f"{float(m['loss']):.3f}", test=f"{res.mean_reward:.3f}")
            if s.stop_at_reward is not None and res.mean_reward >= s.stop_at_reward:
                log(f"sft: step {step}: test reward {res.mean_reward:.3f} >= {s.stop_at_reward} "
                    f"({time.perf_counter() - t0:.1f}s); stopping")
                break
    bar.close()
    if logger:
        logger.close()
    return model_cfg, params, history


def _warm_start_key(cfg: TrainConfig, model_cfg: DenoiserConfig) -> str:
    blob = json.dumps({"model": model_cfg.to_dict(), "task": to_dict(cfg.task), "sft": to_dict(cfg.sft),
                       "eval_sampling": cfg.eval.sampling, "sampling": to_dict(cfg.sampling), "seed": cfg.rl.seed},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warm_start(cfg: TrainConfig, mesh, model_cfg, params, *, progress: bool = True):
    """SFT warm start, cached on disk by a hash of everything that determines it; ``progress`` shows the
    SFT progress bar."""
    cache = Path(cfg.warm_start.cache_dir) / f"{cfg.task.name}-{_warm_start_key(cfg, model_cfg)}"
    if (cache / "params").exists():
        try:
            cached, cached_cfg = restore_params(cache / "params", mesh=mesh)
        except (CheckpointIntegrityError, ValueError) as e:  # damaged files or metadata: never used, rebuilt
            log(f"warm start: the cached SFT checkpoint {cache} is damaged ({e}); rebuilding it")
        else:
            log(f"warm start: reusing cached SFT checkpoint {cache}")
            return cached_cfg, cached
    log("warm start: running SFT (cached afterwards)")
    model_cfg, params, history = run_sft(cfg, mesh=mesh, model_cfg=model_cfg, params=params, progress=progress)
    if jax.process_index() == 0:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    save_params(cache / "params", params, model_cfg)
    return model_cfg, params
