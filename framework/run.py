"""Build a run from a composed config and train it: the body of ``train recipe=...``.

Every object is built by registry name (precision, data, model, task; a task may name its class by ``_target_``).
The resolved config is saved as ``<run_dir>/config.yaml`` and logged to every logger.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lowbit.config import Composed, one_line, plain, to_yaml
from lowbit.errors import LowbitError
from lowbit.models.base import count_parameters
from lowbit.registry import call_with_options, registry
from lowbit.rundir import RunLock, check_run_dir, checkpoint_target, launched_worker, resume_command, run_dir_of

__all__ = ["RunResult", "build", "build_task", "init_weights", "load_weights", "resolve_checkpoint", "train"]


@dataclass
class RunResult:
    """What a finished run reports: its directory, final validation metrics and the baseline."""

    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    baseline_bpb: float | None = None


@dataclass
class Built:
    """Everything a run needs, built but not yet started."""

    task: Any
    data: Any
    precision: Any
    trainer_kwargs: dict[str, Any]


def _device_type(trainer_cfg: dict[str, Any]) -> str:
    import torch

    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise LowbitError(
                f"trainer.accelerator={accelerator} but no CUDA device is visible; use trainer.accelerator=cpu or auto"
            )
        return "cuda"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return accelerator


def _run_dir(composed: Composed) -> Path:
    """Hydra's output directory for this job (``hydra.run.dir``; a sweep job's own subdirectory), made
    unless it holds another run."""
    if composed.run_dir is None:
        raise LowbitError(
            "this config has no run directory; compose it with lowbit.config.compose or run it with train"
        )
    path = composed.run_dir
    if not launched_worker():  # a DDP worker joins the directory rank 0 checked and made
        check_run_dir(path, composed.cfg.resume)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_hydra_files(composed: Composed, run_dir: Path) -> None:
    """``.hydra/{config,overrides,hydra}.yaml`` as Hydra writes them for ``train``, for a run started
    from library code (``train(compose([...]))``) too."""
    folder = run_dir / ".hydra"
    if (folder / "config.yaml").exists():
        return  # the Hydra application wrote them
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(composed.cfg))
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(composed.overrides))))
    if composed.hydra is not None:
        (folder / "hydra.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"hydra": composed.hydra})))


def resolve_checkpoint(resume: str, expected_state=None, notice=print) -> str:
    """A checkpoint file, or a run directory whose ``checkpoints/last.ckpt`` to use; it is verified
    (readable, the same model), and an unreadable one falls back to the previous good one."""
    from lowbit.checkpoint_io import choose_checkpoint, is_sharded, previous_path

    path = checkpoint_target(resume)
    if not path.is_file() and not previous_path(path).is_file() and not is_sharded(path):
        raise LowbitError(
            f"resume={resume}: no checkpoint at {path}; give a .ckpt file or a run directory with checkpoints/last.ckpt"
        )
    return str(choose_checkpoint(path, expected_state, notice=notice))


def _build_target(node: dict[str, Any], what: str, **context: Any) -> Any:
    from hydra.utils import get_object

    options = dict(node)
    target = options.pop("_target_", None)
    if target is None:
        raise LowbitError(f"{what} config needs a _target_ (a dotted path to a class)")
    try:
        factory = get_object(target)
    except Exception as err:
        raise LowbitError(f"{what}._target_ '{target}' cannot be imported: {err}") from err
    return call_with_options(factory, f"{what} '{target}'", options, context)


def _against_baseline(value: float, baseline: float) -> str:
    """``12.3% below the baseline`` or ``4.5% above the baseline`` (never a negative 'below')."""
    change = 100 * (value / baseline - 1)
    if round(change, 1) == 0:
        return "level with the baseline"
    return f"{abs(change):.1f}% {'above' if change > 0 else 'below'} the baseline"


def build_task(config: Mapping[str, Any]) -> Any:
    """The task (a LightningModule, its network as ``.model``) a resolved run config describes, in high
    precision and without its data: what ``build`` trains, ``lowbit export``'s loader fills."""
    model = registry.build("models", config["model"], posenc=config.get("posenc"))
    task_cfg = dict(config["task"])
    context = {
        "model": model,
        "optimizer": config["optimizer"],
        "scheduler": config["scheduler"],
        "max_steps": int(config["trainer"]["max_steps"]),
    }
    if "_target_" in task_cfg:  # a task named by its class rather than by a lowbit.tasks entry point
        return _build_target(task_cfg, "task", **context)
    return registry.build("tasks", task_cfg, **context)


def build(cfg: DictConfig) -> Built:
    """Build precision, data, model and task from a composed config (nothing runs yet)."""
    plain(cfg)  # every interpolation resolves, or one clear error
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise LowbitError(f"{missing[0]} has no value; set it on the command line: {missing[0]}=...")
    trainer_cfg = plain(cfg.trainer)
    device_type = _device_type(trainer_cfg)
    precision = registry.build("precision", plain(cfg.precision), device_type=device_type)
    data = registry.build("data", plain(cfg.data), seed=int(cfg.seed))
    task = build_task(plain(cfg))
    trainer_cfg["strategy"] = _strategy(precision, task, trainer_cfg, device_type)
    precision.convert_module(task)  # now, so a bad layer shape is reported before training; Lightning's call is a no-op
    if cfg.get("init_from"):
        if cfg.get("resume"):
            raise LowbitError(
                "init_from and resume are both set; resume continues a run (weights, optimizer, step), "
                "init_from starts a new one from a checkpoint's weights: set one"
            )
        init_weights(task, str(cfg.init_from))
    return Built(task=task, data=data, precision=precision, trainer_kwargs=trainer_cfg)


_QUANTIZER_KEYS = (".weight_quant.", ".input_quant.")  # QAT quantizers' parameters and buffers


def init_weights(task: Any, source: str) -> None:
    """Load a checkpoint's model weights into ``task`` (``init_from``): a fine-tune or QAT run starting
    from a trained one. Every weight must match by name and shape; the QAT quantizers' state is
    optional either way (a BF16 checkpoint into a QAT model: the scales initialize from the data;
    a QAT checkpoint into any model: its learned scales come along where the layers have them).
    Optimizer, step and scheduler start fresh."""

    from lowbit.checkpoint_io import is_sharded, load_checkpoint

    path = checkpoint_target(source)
    if not path.is_file() and not is_sharded(path):
        raise LowbitError(
            f"init_from={source}: no checkpoint at {path}; give a .ckpt file or a run directory with checkpoints/last.ckpt"
        )
    try:
        ckpt = load_checkpoint(path)
    except Exception as err:
        raise LowbitError(f"init_from={source}: cannot read {path} as a checkpoint: {one_line(err)}") from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise LowbitError(f"init_from={source}: {path} holds no state_dict; give a checkpoint written by train")
    load_weights(task, state, f"init_from={source}: checkpoint {path}")


def load_weights(task: Any, state: dict[str, Any], what: str, quantizers: bool = True) -> None:
    """``state``'s weights into ``task``: every key but the QAT quantizers' must match by name and shape,
    else one line starting with ``what`` (the source) names the first that does not. ``quantizers``:
    also load the source's quantizer state where both have it (``init_from``); False leaves the model's
    (``lowbit quantize`` sets the scales itself)."""
    own = task.state_dict()
    optional = lambda key: any(part in key for part in _QUANTIZER_KEYS)  # noqa: E731
    weights = {k: v for k, v in state.items() if quantizers or not optional(k)}
    missing = [k for k in own if k not in weights and not optional(k)]
    unexpected = [k for k in weights if k not in own and not optional(k)]
    for keys, verb in ((missing, "has no"), (unexpected, "has a key the model lacks:")):
        if keys:
            raise LowbitError(f"{what} {verb} '{keys[0]}' ({len(keys)} such key(s)); it holds another model")
    for key, value in weights.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise LowbitError(
                f"{what}: '{key}' is {tuple(value.shape)} there but {tuple(own[key].shape)} in this model; "
                "the model config differs"
            )
    task.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)


FSDP_NAMES = ("fsdp", "fsdp2", "model_parallel")
"""``trainer.strategy`` names that mean FSDP2: Lightning's ``ModelParallelStrategy`` (data parallel over
every process, no tensor parallelism), each block sharded by the task's ``configure_model``."""

_REFUSED = {
    "deepspeed": "DeepSpeed wraps the model's layers and brings its own mixed precision, bypassing lowbit's "
    "quantized layers and precision plugins",
    "fsdp_cpu_offload": "Lightning's fsdp_cpu_offload is FSDP1, which flattens parameters and bypasses the "
    "quantized layers; use trainer.strategy=fsdp (FSDP2)",
    "xla": "lowbit's precision plugins and kernels run on CPU and CUDA, not XLA",
}


def _world_size(trainer_cfg: dict[str, Any], device_type: str) -> int:
    """Processes the run will start: devices per node times nodes (``auto``: the GPUs visible, one CPU process)."""
    import torch

    devices = trainer_cfg.get("devices", "auto")
    if isinstance(devices, list):
        per_node = len(devices)
    elif devices == "auto":
        per_node = torch.cuda.device_count() if device_type == "cuda" else 1
    else:
        per_node = int(devices)
    return per_node * int(trainer_cfg.get("num_nodes", 1))


def _strategy(precision: Any, task: Any, trainer_cfg: dict[str, Any], device_type: str) -> Any:
    """``trainer.strategy`` as the Trainer takes it: a Lightning name, or for ``fsdp`` a
    ``ModelParallelStrategy`` (FSDP2); a name Lightning lacks, or a strategy that would bypass the
    quantized layers, is one line naming why."""
    from lightning.pytorch.strategies import StrategyRegistry

    strategy = trainer_cfg.get("strategy", "auto")
    if not isinstance(strategy, str):
        return strategy  # an object built from a _target_: the user's choice, as Lightning takes it
    name = strategy.lower()
    if name in FSDP_NAMES:
        from lightning.pytorch.strategies import ModelParallelStrategy

        world = _world_size(trainer_cfg, device_type)
        _check_shardable(task, world)
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    known = ("auto", *StrategyRegistry.available_strategies())
    if name not in known:
        names = ", ".join(["auto", "ddp", "ddp_spawn", "fsdp", "single_device"])
        raise LowbitError(
            f"trainer.strategy={strategy} is not a strategy; use one of {names} (Lightning's others by name)"
        )
    refused = next((why for key, why in _REFUSED.items() if name.startswith(key)), None)
    if refused is not None and getattr(precision, "recipe", None) is not None:
        raise LowbitError(f"precision '{precision.name}' cannot run with trainer.strategy={strategy}: {refused}")
    return strategy


def _check_shardable(task: Any, world: int) -> None:
    """FSDP2 shards every parameter along dim 0 (padding the last shards): a model none of whose
    parameters has a row for every process would leave ranks holding nothing at all."""
    rows = max((p.shape[0] if p.dim() else 1 for p in task.parameters()), default=0)
    if rows < world:
        raise LowbitError(
            f"trainer.strategy=fsdp over {world} processes: the model's largest parameter has {rows} row(s), fewer "
            f"than the {world} shards; use fewer devices, a wider model, or trainer.strategy=ddp"
        )


def _callbacks(cfg: DictConfig, ckpt_dir: Path, echo=print) -> list:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lowbit.callbacks.checkpoint import Preemption
    from lowbit.callbacks.comm import CommBytes
    from lowbit.callbacks.health import QuantHealth, StopOnNonFinite
    from lowbit.callbacks.rounding import SeedStochasticRounding
    from lowbit.callbacks.throughput import Throughput

    every = int(cfg.checkpoint.every_n_steps)
    callbacks = [
        # last.ckpt every N steps; step-N.ckpt files too when checkpoint.keep_all
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step-{step}",
            every_n_train_steps=every,
            save_top_k=-1 if cfg.checkpoint.get("keep_all", False) else 0,
            save_last=True,
            auto_insert_metric_name=False,
        ),
        Preemption(ckpt_dir, notice=echo),  # SIGTERM, SIGUSR1, Ctrl-C: last.ckpt after this step, then stop
        QuantHealth(int(cfg.health.every_n_steps), path=ckpt_dir.parent / "health.csv"),
        StopOnNonFinite(ckpt_dir / "last.ckpt"),  # a NaN never reaches the weights or a checkpoint
        SeedStochasticRounding(int(cfg.seed)),  # SR noise from (seed, step): resumes are exact
        Throughput(),  # in the task's throughput_unit (tokens, images)
        CommBytes(),  # under FSDP2: bytes this rank all-gathers and reduce-scatters per step
    ]
    if cfg.trainer.get("enable_progress_bar", True) and not sys.stdout.isatty():
        from lowbit.callbacks.progress import LineProgress

        callbacks.append(LineProgress(int(cfg.trainer.get("log_every_n_steps") or 10)))  # lines, not \r updates
    if cfg.checkpoint.save_best:
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="best",
                monitor="val/loss",
                mode="min",
                save_top_k=1,
                auto_insert_metric_name=False,
            )
        )
    return callbacks


def _seed(seed: int) -> None:
    from lightning.pytorch import seed_everything

    seed_everything(seed, workers=True, verbose=False)


def _trainer(built: Built, loggers: list, callbacks: list, run_dir: Path):
    """Lightning's Trainer for a built run; a trainer option Lightning rejects is one line."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lowbit.checkpoint_io import DurableCheckpointIO

    if "precision" in built.trainer_kwargs:
        raise LowbitError(
            f"trainer.precision={built.trainer_kwargs['precision']} would fight the precision plugin; "
            "choose the precision with precision=NAME (lowbit plugins lists them)"
        )
    try:
        return L.Trainer(
            **built.trainer_kwargs,
            plugins=[built.precision, DurableCheckpointIO()],  # temp file, fsync, rename; the previous kept
            logger=loggers,
            callbacks=callbacks,
            default_root_dir=str(run_dir),
            check_val_every_n_epoch=None,  # validation by steps: the training stream is endless
            # evaluation under no_grad, as the validation inside fit runs: inference tensors would make every
            # compiled quantize kernel compile again for trainer.validate (its guards check the dispatch keys)
            inference_mode=False,
            # lowbit's data modules give each rank its slice of the global batch; others get Lightning's sampler
            use_distributed_sampler=not getattr(built.data, "shards_by_rank", False),
            max_epochs=-1,
        )
    except (TypeError, ValueError, MisconfigurationException) as err:
        raise LowbitError(f"trainer: {one_line(err)}") from err


def train(composed: Composed, echo=print, callbacks: Sequence[Any] = ()) -> RunResult:
    """Train one composed config to the end (or Ctrl-C) in its run directory; print and return the
    final metrics. Its W&B run is named ``cfg.name``, grouped by experiment (model, data, budget:
    see ``lowbit.experiment``), tagged by the choices, and finished before this returns.
    ``callbacks``: Lightning callbacks added to the run's own (``lowbit bench speed`` times a run so)."""

    cfg = composed.cfg
    worker = launched_worker()
    if worker:  # rank 0 says it all
        echo = lambda *_: None  # noqa: E731
    _seed(int(cfg.seed))
    built = build(cfg)
    resume = resolve_checkpoint(cfg.resume, built.task.state_dict(), notice=echo) if cfg.resume else None
    run_dir = _run_dir(composed)
    with contextlib.ExitStack() as stack:
        if resume:
            resume = _resume_layout(resume, built, stack, echo)
        return _train(composed, built, resume, run_dir, worker, echo, list(callbacks))


def _resume_layout(resume: str, built: Built, stack: contextlib.ExitStack, echo) -> str:
    """``resume`` in the layout this run's strategy loads: a sharded (FSDP2) checkpoint gathered into
    one temporary file for one process or DDP, a one-file checkpoint written as a temporary sharded
    folder for FSDP2 (which reshards it to its world size); removed when the run ends."""
    import tempfile

    from lightning.pytorch.strategies import ModelParallelStrategy

    from lowbit.checkpoint_io import is_sharded, write_sharded, write_unsharded

    fsdp = isinstance(built.trainer_kwargs.get("strategy"), ModelParallelStrategy)
    if is_sharded(resume) == fsdp:
        return resume
    # beside the checkpoint, not in /tmp: FSDP2 loads rank 0's copy on every node
    parent = Path(resume).parent
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".lowbit-resume-", dir=parent)))
    if fsdp:
        echo(f"resume: writing {resume} as a sharded checkpoint for trainer.strategy=fsdp")
        return str(write_sharded(resume, built.task, folder / Path(resume).name))
    echo(f"resume: gathering the shards of {resume} into one checkpoint for this run's strategy")
    return str(write_unsharded(resume, folder / Path(resume).name))


def _train(
    composed: Composed, built: Built, resume: str | None, run_dir: Path, worker: bool, echo, extra: list
) -> RunResult:
    from lowbit.callbacks.baseline import BaselineLoss
    from lowbit.experiment import baseline_roots, experiment_name
    from lowbit.logging import build_loggers, tags, wandb_run_id

    cfg = composed.cfg
    config = plain(cfg)
    source = run_dir_of(str(cfg.resume)) if resume else None  # resume itself may be a gathered temporary file
    run_id = wandb_run_id(source) if source else None
    loggers = build_loggers(
        config["logger"],
        run_dir,
        str(cfg.name),
        experiment_name(config),
        tags(composed.choices, config["logger"].get("tags") or ()),
        run_id=run_id,
    )
    ckpt_dir = run_dir / "checkpoints"
    against = BaselineLoss(config, baseline_roots(run_dir), run_dir)
    trainer = _trainer(built, loggers, [*_callbacks(cfg, ckpt_dir, echo), against, *extra], run_dir)

    # the run is valid: from here on it writes into its directory, which it (rank 0 and its workers) holds alone
    with contextlib.nullcontext() if worker else RunLock(run_dir, notice=echo):
        return _fit(composed, built, trainer, loggers, against, run_dir, resume, echo, worker)


def _fit(composed, built, trainer, loggers, against, run_dir, resume, echo, worker=False) -> RunResult:
    import torch

    from lowbit.checkpoint_io import checkpoint_step
    from lowbit.errors import Preempted
    from lowbit.logging import describe, finish, trim_csv

    cfg, config, ckpt_dir = composed.cfg, plain(composed.cfg), run_dir / "checkpoints"
    if resume and not worker:  # continuing in place: the rows after the checkpoint's step are logged again
        step = checkpoint_step(resume)
        for log in (run_dir / "csv" / "metrics.csv", run_dir / "health.csv"):
            trim_csv(log, step)
    if not worker:
        _write_hydra_files(composed, run_dir)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    ckpt_dir.mkdir(exist_ok=True)
    for lg in loggers:
        lg.log_hyperparams({**config, "recipe": composed.recipe, "choices": composed.choices})
    baseline = built.data.unigram_bits_per_byte() if hasattr(built.data, "unigram_bits_per_byte") else None
    n_params = count_parameters(getattr(built.task, "model", built.task))  # not the EMA's copies
    echo(f"run: {cfg.name} | recipe: {composed.recipe or '(none)'} | run dir: {run_dir}")
    echo(f"precision: {getattr(built.precision, 'description', type(built.precision).__name__)}")
    echo(f"model: {cfg.model.name}, {n_params / 1e6:.2f}M parameters | torch threads: {torch.get_num_threads()}")
    for line in (describe(loggers), against.description):
        if line:
            echo(line)
    if baseline is not None:
        echo(f"unigram baseline: {baseline:.4f} bits/byte on the validation split")

    result = RunResult(run_dir=run_dir, baseline_bpb=baseline)
    try:
        trainer.fit(built.task, datamodule=built.data, ckpt_path=resume)
    except Preempted as stop:
        finish(loggers, exit_code=stop.exit_code)
        echo(f"{stop}\nresume with: {resume_command(composed, run_dir)}")
        raise
    except SystemExit as stop:  # Lightning exits so after a KeyboardInterrupt (a second Ctrl-C)
        finish(loggers, exit_code=130)
        raise KeyboardInterrupt from stop
    except BaseException:
        finish(loggers, exit_code=1)
        raise
    trainer.save_checkpoint(ckpt_dir / "last.ckpt", weights_only=False)  # the final state, whatever the save interval
    metrics = trainer.validate(built.task, datamodule=built.data, verbose=False)[0]
    result.metrics = {k: float(v) for k, v in metrics.items()}
    finish(loggers, summary={f"final/{k}": v for k, v in result.metrics.items()})
    bpb = result.metrics.get("val/bpb")
    if bpb is not None and baseline:
        echo(f"val bits/byte: {bpb:.4f} | unigram baseline: {baseline:.4f} | {_against_baseline(bpb, baseline)}")
    elif result.metrics:
        echo("val: " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if math.isfinite(v)))
    return result
