"""The RL run of ``gdsd-jax train``: warm start, checkpoints and exact resume, the loop, evaluation before and after."""

from __future__ import annotations

import dataclasses
import json
import signal

import jax
from etils import epath
from tqdm.auto import tqdm

from gdsd_jax.allocator import active_allocator
from gdsd_jax.checkpoint.params_io import is_params_checkpoint, save_params, storage_path
from gdsd_jax.checkpoint.policy import BASE_DIR, POLICY_DIR, earlier_run_files
from gdsd_jax.checkpoint.train_state import RunCheckpointer
from gdsd_jax.config_io import ConfigError, build, to_dict
from gdsd_jax.distributed import multihost
from gdsd_jax.loading import write_policy
from gdsd_jax.models.config import execution_record
from gdsd_jax.rl.trainer import NonFiniteError, RLTrainer, merged_policy_params, warmup_note
from gdsd_jax.sft.run import warm_start
from gdsd_jax.training.config import TrainConfig
from gdsd_jax.training.evaluate import EvalResult, evaluate, write_eval
from gdsd_jax.training.metrics import MetricsLogger, log, new_wandb_id, wandb_settings
from gdsd_jax.training.setup import (
    build_eval_adapter,
    build_mesh,
    build_model,
    build_task,
    build_task_and_adapter,
    eval_examples,
    index_iterator,
)

# ---- RL -----------------------------------------------------------------------------------------

def _advantage_name(method: str, scale_std: bool) -> str:
    return f"{method}{', std-scaled' if scale_std else ''}"


def describe_advantages(cfg: TrainConfig) -> str:
    """One log line: the advantages the run trains with, and where an ``rl.*`` setting overrides the
    objective's own choice."""
    name = cfg.objective.name
    used = _advantage_name(*cfg.advantage_settings())
    explicit = [f"rl.{k}={getattr(cfg.rl, k)}" for k in ("advantage", "scale_std") if getattr(cfg.rl, k) is not None]
    if not explicit:
        return f"advantages: {used} ({name}'s own)"
    own_cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, advantage=None, scale_std=None))
    own = _advantage_name(*own_cfg.advantage_settings())
    return f"advantages: {used} (set by {', '.join(explicit)}; {name}'s own: {own})"


@dataclasses.dataclass
class TrainResult:
    before: EvalResult | None
    after: EvalResult | None
    steps: int
    output_dir: epath.Path


class _Preemption:
    """SIGTERM sets a flag; the loop checkpoints and exits after the current step."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def run_train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
              stop_after: int | None = None) -> TrainResult:
    """The whole RL run. ``stop_after`` ends the loop early after that many steps of this process (tests).

    A run directory holding an earlier run is refused unless ``resume`` (continue it) or ``overwrite``
    (delete its files first) says what to do with it, before anything is written.
    """
    cfg.validate()
    multihost.initialize(cfg.distributed.coordinator_address, cfg.distributed.num_processes,
                         cfg.distributed.process_id)
    cfg.validate(num_devices=jax.device_count(), num_processes=jax.process_count())
    task = build_task(cfg)   # settings that need the task (and the code sandbox's layers) fail here, at start
    out = storage_path(cfg.output_dir)     # local or gs://; a bucket without its packages fails here
    earlier = [] if resume else earlier_run_files(out)
    if earlier and not overwrite:
        raise FileExistsError(f"{out} already holds an earlier run ({', '.join(earlier)}); pass --resume to "
                              f"continue it, --overwrite to delete it and start afresh, or choose another "
                              f"--output-dir")
    # Every process has looked at the directory before process 0 writes to it: a slower process must not
    # mistake the files of this run's process 0 for an earlier run.
    multihost.barrier("gdsd-jax: run directory checked")
    if jax.process_index() == 0:
        for name in earlier:
            if (out / name).is_dir():
                (out / name).rmtree()
            else:
                (out / name).unlink()
        if earlier:
            log(f"--overwrite: deleted the earlier run's {', '.join(earlier)} in {out}")
        out.mkdir(parents=True, exist_ok=True)
    mesh = build_mesh(cfg)
    log(f"mesh {dict(mesh.shape)} on {jax.devices()[0].platform}; host allocator: {active_allocator()}")
    ckpt = RunCheckpointer(out / "checkpoints", keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best,
                           async_save=cfg.checkpoint.async_save)
    resume_step = ckpt.latest_step() if resume else None
    if resume and resume_step is not None:
        # The saved config is rebuilt first, so that sections an older run stored sparsely (only the keys its
        # file set) compare by value with today's full ones.
        _check_resume_config(to_dict(build(TrainConfig, ckpt.newest_meta()[1]["config"])), to_dict(cfg))
    elif resume:    # launchers pass --resume on every start, the first one included
        log(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from step 0")
    if resume_step is not None and resume_step >= cfg.rl.total_steps and (out / "eval_final_summary.json").exists():
        log(f"--resume: the run finished at step {resume_step} (rl.total_steps={cfg.rl.total_steps}) and its final "
            f"evaluation is in {out / 'eval_final_summary.json'}; nothing to do (raise rl.total_steps to train on)")
        ckpt.close()
        return TrainResult(None, None, resume_step, out)

    left_out = cfg.model.split_overrides()[1]
    if left_out:
        log(f"model.checkpoint brings its own architecture: model.overrides {', '.join(left_out)} (the preset's) "
            f"not applied")
    note = warmup_note(cfg.optim, cfg.rl.total_steps)
    if note:
        log(note)
    model_cfg, params = build_model(cfg, mesh)
    if cfg.warm_start.mode == "sft" and not cfg.model.checkpoint:
        model_cfg, params = warm_start(cfg, mesh, model_cfg, params, progress=progress)
    if cfg.lora.enabled and not cfg.model.checkpoint and not is_params_checkpoint(out / BASE_DIR):
        # The adapters of a saved step need their base to become a model again (export, eval).
        save_params(out / BASE_DIR, params, model_cfg)
    task, adapter, tokenizer = build_task_and_adapter(cfg, model_cfg, task=task)
    trainer = RLTrainer(cfg, model_cfg, params, mesh, adapter, task, tokenizer=tokenizer)
    log(describe_advantages(cfg))
    # The config keeps "auto" (a saved policy stays portable across backends); the run records what it chose.
    execution = execution_record(model_cfg, mesh)
    log("model execution: " + ", ".join(f"{k}={v}" for k, v in execution.items()))
    state, frozen = trainer.init_state()
    train = list(task.examples("train"))
    data_it = index_iterator(len(train), cfg.rollout_prompts, cfg.rl.seed)
    test = eval_examples(task, cfg)
    escfg = trainer.eval_sampling_cfg
    eval_adapter = build_eval_adapter(cfg, task, adapter, model_cfg, tokenizer)

    def run_eval(st) -> EvalResult:
        p, lora = trainer.parts.policy(st["trainable"], frozen)
        return evaluate(p, model_cfg, eval_adapter, test, escfg, mesh, lora=lora, batch_size=cfg.eval.batch_size)

    meta = {"config": to_dict(cfg), "model_config": model_cfg.to_dict(), "nonfinite_total": 0, "before": None,
            "best_eval": None, "wandb_id": new_wandb_id()}
    if resume_step is not None:
        restored = ckpt.restore_newest_intact(trainer.abstract_state(state))
        for step, reason, moved in restored.rejected:
            log(f"checkpoint step {step} rejected ({reason}); resuming from step {restored.step} instead "
                f"(step {step} moved to {moved})")
        state, meta, resume_step = restored.state, restored.meta, restored.step
        meta.setdefault("wandb_id", new_wandb_id())     # a run saved before W&B logging existed
        # Every process walks the same global index stream, so one iterator state serves any topology.
        data_it.set_state(meta["data_state"])
        log(f"resumed from step {resume_step}")
    meta["execution"] = execution
    logger = MetricsLogger(out, tensorboard=cfg.tensorboard, resume_step=resume_step,
                           wandb=wandb_settings(cfg, out, meta["wandb_id"]) if cfg.logging.wandb else None)
    if jax.process_index() == 0:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")

    before = None
    if cfg.eval.initial and meta.get("before") is None:
        before = run_eval(state)
        meta["before"] = before.mean_reward
        meta["before_accuracy"] = before.accuracy
        logger.log(0, {"test_reward": before.mean_reward, "test_accuracy": before.accuracy})
        log(_eval_line(0, before))

    start = int(state["step"])
    total = cfg.rl.total_steps
    nonfinite_run = 0
    after = None
    done_here = 0
    with _Preemption() as pre:
        bar = tqdm(range(start, total), initial=start, total=total, desc="gdsd",
                   disable=not progress or jax.process_index() != 0)
        for _ in bar:
            examples = [train[i] for i in next(data_it)]    # this process's prompts only
            state, m = trainer.rl_step(state, frozen, examples)
            step = int(state["step"])
            meta["nonfinite_total"] = meta.get("nonfinite_total", 0) + m["nonfinite_updates"]
            nonfinite_run = nonfinite_run + 1 if m["nonfinite_updates"] else 0
            eval_reward = None
            if cfg.eval.every and step % cfg.eval.every == 0 and step != total:
                res = run_eval(state)
                m.update(test_reward=res.mean_reward, test_accuracy=res.accuracy)
                eval_reward = res.mean_reward
                log(_eval_line(step, res))
            logger.log(step, m)
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", loss=f"{m['loss']:.2e}",
                            **({"test": f"{eval_reward:.3f}"} if eval_reward is not None else {}))
            if nonfinite_run >= cfg.rl.max_nonfinite_in_a_row:
                ckpt.wait()
                message = _nonfinite_stop_message(nonfinite_run, step, ckpt)
                ckpt.close()
                logger.close()
                raise NonFiniteError(message)
            last = step == total
            if last or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or pre.requested:
                meta["data_state"] = data_it.get_state()
                ckpt.save(step, state, meta, eval_reward=eval_reward)
            done_here += 1
            if pre.requested:
                log(f"SIGTERM: checkpoint written at step {step}; exiting")
                ckpt.close()
                logger.close()
                raise SystemExit(143)
            if stop_after is not None and done_here >= stop_after:
                break
        bar.close()
    if int(state["step"]) == total:
        policy = write_policy(out / POLICY_DIR, merged_policy_params(trainer.parts, state["trainable"], frozen),
                              model_cfg, upstream=cfg.model.checkpoint, source={"run": str(out), "step": total})
        log(f"policy (step {total}) written to {policy}")
        after = run_eval(state)
        logger.log(total, {"test_reward": after.mean_reward, "test_accuracy": after.accuracy})
        log(_eval_line(total, after, final=True))
        if jax.process_index() == 0:
            write_eval(after, out, "eval_final")
    ckpt.close()
    logger.close()
    if after is not None:
        _print_summary(meta["before"], meta.get("before_accuracy"), after, out, cfg.objective.name)
    return TrainResult(before, after, int(state["step"]), out)


def _eval_line(step: int, res: EvalResult, final: bool = False) -> str:
    """The console line of one evaluation (it stays above the progress bar)."""
    return (f"step {step}{' (final)' if final else ''}: test reward {res.mean_reward:.3f}, "
            f"accuracy {res.accuracy:.3f} ({len(res.rewards)} examples)")


def _nonfinite_stop_message(in_a_row: int, step: int, ckpt: RunCheckpointer) -> str:
    """Why the run stops, and what it leaves behind (checkpoints are never written with non-finite values)."""
    last = ckpt.latest_step()
    left = (f"the newest checkpoint is step {last} in {ckpt.directory} (saved with finite values)"
            if last is not None else f"no checkpoint was written in {ckpt.directory}")
    return (f"{in_a_row} steps in a row with a non-finite update (loss, gradient, or updated parameters or "
            f"optimizer state), the last at step {step}; these updates were skipped, not applied. Stopping: {left}.")


def _check_resume_config(saved: dict, current: dict, prefix: str = "") -> None:
    """A resume must use the same model, LoRA shape, task and batch shapes; name the first field that differs."""
    critical = ("model", "lora", "task", "objective", "rl.num_generations", "rl.prompts_per_step",
                "rl.rollout_prompts_per_step", "rl.micro_batch_size", "sampling")
    for key in critical:
        parts = key.split(".")
        a, b = saved, current
        for p in parts:
            a = a.get(p) if isinstance(a, dict) else None
            b = b.get(p) if isinstance(b, dict) else None
        if a != b:
            detail = ""
            if isinstance(a, dict) and isinstance(b, dict):
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                detail = f" (field(s) {', '.join(key + '.' + k for k in diff)})"
            raise ConfigError(f"--resume: config mismatch in {key}{detail}: checkpoint has {a!r}, now {b!r}")


def _print_summary(before: float | None, before_accuracy: float | None, after: EvalResult, out: epath.Path,
                   method: str = "GDSD") -> None:
    """The before/after table (test reward and accuracy); without a step-0 evaluation (``eval.initial:
    false``) only the final numbers."""
    if jax.process_index() != 0:
        return
    reward, accuracy = after.mean_reward, after.accuracy
    if before is None:
        lines = ["", f"greedy test reward after {method}: {reward:.3f}, accuracy {accuracy:.3f} (no step-0 "
                 f"evaluation)", f"run directory: {out}"]
    else:
        acc_before = "n/a" if before_accuracy is None else f"{before_accuracy:.3f}"
        acc_change = "" if before_accuracy is None else f"{accuracy - before_accuracy:+.3f}"
        lines = ["", "| greedy test set | reward | accuracy |", "|---|---|---|",
                 f"| before (warm start) | {before:.3f} | {acc_before} |", f"| after {method} | {reward:.3f} | "
                 f"{accuracy:.3f} |", f"| change | {reward - before:+.3f} | {acc_change} |", "",
                 f"run directory: {out}", f"test_reward: {before:.3f} -> {reward:.3f}"]
    print("\n".join(lines), flush=True)
