"""Everything a manager is told, checked and normalised before anything happens.

:func:`build_options` turns the keyword arguments of ``CheckpointManager(...)`` (or of
``CheckpointManager.resume(...)``) into one immutable :class:`ManagerOptions`. Every argument
problem is raised here, as ``TypeError``/``ValueError`` naming the argument, before any
object is restored, any run is started or any lease is taken. The flat keywords
(``save_every_n_steps=``, ``keep_last_n=``...) are shorthand: they become the same trigger
and retention objects a user may pass as ``triggers=[...]`` and ``retention=...``.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

import torch
from mlflow import MlflowClient

from mlflow_ckpt.codec import check_format
from mlflow_ckpt.codec.zstd_io import check_level
from mlflow_ckpt.folder import MODEL_KEY, FolderSpec, factory_path
from mlflow_ckpt.manager.job import JobKey, job_key
from mlflow_ckpt.manager.metrics import check_metric_name
from mlflow_ckpt.manager.preemption import DEFAULT_GRACE_S, parse_signals, signals_asked
from mlflow_ckpt.manager.retention import (
    ArchiveAfterN,
    KeepAny,
    KeepEveryNSteps,
    RetentionPolicy,
    build_policy,
    policy_members,
)
from mlflow_ckpt.manager.triggers import (
    BestMetric,
    EveryNEpochs,
    EveryNSeconds,
    EveryNSteps,
    Trigger,
    YoungDalyInterval,
)
from mlflow_ckpt.manager.verification import VERIFY_MODES, Verify
from mlflow_ckpt.snapshot.tree import TensorSink, encode
from mlflow_ckpt.storage import TransferConfig

T = TypeVar("T")


@dataclass(frozen=True)
class ManagerOptions:
    """A manager's checked configuration (see ``CheckpointManager`` for each meaning)."""

    triggers: tuple[Trigger, ...]
    retention: RetentionPolicy | None
    spec: FolderSpec
    monitor: str | None
    mode: str
    async_save: bool
    save_last: bool
    log_metrics: bool
    on_error: str
    nonfinite: str
    verify: Verify
    spike: tuple[str, float] | None  # (metric, factor)
    timeline: bool
    force: bool
    lease_ttl: float
    transfer: TransferConfig | None
    client: MlflowClient | None
    distributed: bool = False  # every rank builds a manager; sharded state through DCP
    # Write only what changed since the previous checkpoint (distributed saves: by chunk).
    incremental: bool = True
    archive: ArchiveAfterN | None = None  # retention's third outcome (archive_after_n=)
    job: JobKey | None = None  # resume="auto": the job whose run this manager opens itself
    signals: tuple[int, ...] = ()  # save_on_signals=: save and stop on these
    preempt_grace_s: float = DEFAULT_GRACE_S

    @property
    def format(self) -> str:
        return self.spec.format


class OptionView(Generic[T]):
    """A read-only attribute of the manager that shows one of its options."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> OptionView[T]: ...

    @overload
    def __get__(self, obj: object, objtype: type | None = None) -> T: ...

    def __get__(self, obj: object | None, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj.options, self.name)  # type: ignore[attr-defined]


def option_arguments(signature: inspect.Signature, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The complete keyword arguments of ``signature`` (defaults filled in) for ``kwargs``.

    Unknown names raise ``TypeError`` listing the accepted ones, as a call would.
    """
    accepted = {
        name: param.default
        for name, param in signature.parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY and name != "run_id"
    }
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {', '.join(unknown)}; CheckpointManager accepts "
            f"{', '.join(sorted(accepted))}"
        )
    return {**accepted, **kwargs}


def build_options(args: Mapping[str, Any]) -> ManagerOptions:
    """Check every constructor keyword in ``args`` and build the options from them.

    The checks run in a fixed order (numbers, spike watch, flags, choices, objects, then
    the options built from several keywords), so one bad call always gets the same error.
    """
    mode, monitor = args["mode"], args["monitor"]
    _check_intervals(args)
    spike = _spike(args, monitor, mode)
    _positive("lease_ttl", args["lease_ttl"], float)
    _check_flags(args, _FLAGS)
    _check_choices(args)
    if monitor is not None:
        check_metric_name(monitor, "monitor")
    _check_instances(args)
    distributed = _distributed_mode(args.get("distributed"))
    _check_flags(args, ("incremental",))
    spec = _folder_spec(args)
    retention = _retention(args, monitor, mode)
    archive = _archive(args, retention)
    job, signals = _preemption(args)
    grace = args.get("preempt_grace_s")  # None: the default, as for every other option
    grace_s = DEFAULT_GRACE_S if grace is None else float(grace)
    triggers = _triggers(args, monitor, mode)
    verify = _verify(args)
    return ManagerOptions(
        job=job,
        signals=signals,
        preempt_grace_s=grace_s,
        archive=archive,
        distributed=distributed,
        incremental=args["incremental"],
        triggers=triggers,
        retention=retention,
        spec=spec,
        monitor=monitor,
        mode=mode,
        async_save=args["async_save"],
        save_last=args["save_last"],
        log_metrics=args["log_metrics"],
        on_error=args["on_error"],
        nonfinite=args["nonfinite"],
        verify=verify,
        timeline=args["timeline"],
        spike=spike,
        force=args["force"],
        lease_ttl=float(args["lease_ttl"]),
        transfer=args["transfer"],
        client=args["client"],
    )


# Keywords that take a positive int (None: off), the boolean ones, and those that take one
# of a few strings: tables, so a new keyword of a known kind is one more entry, not a branch.
_POSITIVE_INTS = (
    "save_every_n_steps",
    "save_every_n_epochs",
    "max_shard_bytes",
    "keep_last_n",
    "keep_best_n",
    "keep_every_n_steps",
    "archive_after_n",
)
_FLAGS = ("save_last", "async_save", "log_metrics", "force", "timeline")
_CHOICES = (
    ("mode", ("min", "max")),
    ("on_error", ("raise", "warn")),
    ("nonfinite", ("skip", "save", "raise")),
)
# Objects handed through as they are: their types are checked, nothing more.
_INSTANCES = (("transfer", TransferConfig), ("client", MlflowClient))


def _check_intervals(args: Mapping[str, Any]) -> None:
    """The counts and intervals, and ``save_every_n_seconds='auto'``'s pairing with
    ``mtbf_hours=`` (the Young/Daly interval needs both, and neither means anything alone)."""
    for name in _POSITIVE_INTS:
        _positive(name, args[name], int)
    auto = args["save_every_n_seconds"] == "auto"
    if not auto:
        _positive("save_every_n_seconds", args["save_every_n_seconds"], float)
    _positive("mtbf_hours", args["mtbf_hours"], float)
    if auto != (args["mtbf_hours"] is not None):
        raise ValueError(
            "save_every_n_seconds='auto' and mtbf_hours= go together: the interval is "
            "sqrt(2 x save cost x mean time between failures)"
        )


def _spike(args: Mapping[str, Any], monitor: str | None, mode: str) -> tuple[str, float] | None:
    """The spike watch, ``(metric, factor)``, or ``None`` without ``spike_factor=``.

    The metric is ``spike_metric=``, else the monitored one, which must then be minimised:
    a spike is a jump up, what a loss does when training diverges.
    """
    factor, metric = args["spike_factor"], args["spike_metric"]
    watched: str | None = metric or monitor
    _positive("spike_factor", factor, float)
    if factor is not None:
        if factor <= 1:
            raise ValueError(f"spike_factor must be above 1, got {factor}")
        if watched is None:
            raise ValueError("spike_factor needs a metric: pass monitor= or spike_metric=")
        if metric is None and mode == "max":
            raise ValueError(
                f"spike_factor watches for a metric jumping up (a loss); monitor={monitor!r} "
                "is maximised, so pass spike_metric= naming a loss-like metric"
            )
    if metric is not None:
        check_metric_name(metric, "spike_metric")
    if factor is None or watched is None:  # (a factor without a metric was refused above)
        return None
    return watched, float(factor)


def _check_flags(args: Mapping[str, Any], names: Sequence[str]) -> None:
    """Booleans must be ``bool``: a truthy string such as ``"false"`` would silently mean on."""
    for name in names:
        if not isinstance(args[name], bool):
            raise TypeError(f"{name} must be True or False, not {args[name]!r}")


def _check_choices(args: Mapping[str, Any]) -> None:
    for name, allowed in _CHOICES:
        if args[name] not in allowed:
            quoted = [repr(choice) for choice in allowed]
            listed = f"{', '.join(quoted[:-1])} or {quoted[-1]}"
            raise ValueError(f"{name} must be {listed}, not {args[name]!r}")


def _check_instances(args: Mapping[str, Any]) -> None:
    for name, kind in _INSTANCES:
        if args[name] is not None and not isinstance(args[name], kind):
            raise TypeError(f"{name} must be a {kind.__name__} or None, not {args[name]!r}")


def _preemption(args: Mapping[str, Any]) -> tuple[JobKey | None, tuple[int, ...]]:
    """``resume="auto"``'s job key (``run_name=`` or the environment) and the signals to
    save on (SIGTERM by default with ``resume="auto"``, none otherwise)."""
    resume, run_name = args.get("resume"), args.get("run_name")
    if resume not in (None, "auto"):
        raise ValueError(f"resume must be None or 'auto', not {resume!r}")
    if run_name is not None and resume is None:
        raise TypeError(
            "run_name= names the job whose run resume='auto' opens and continues; pass "
            "resume='auto' too (without it the manager writes the active run or run_id=)"
        )
    _positive("preempt_grace_s", args.get("preempt_grace_s"), float)
    job = job_key(run_name) if resume == "auto" else None
    return job, parse_signals(signals_asked(args.get("save_on_signals"), resume))


def check_state(state: Mapping[str, Any], options: ManagerOptions | None = None) -> None:
    """Fail at construction, not hours later, if something in the state can't be saved.

    This encodes the whole state once (every ``state_dict()`` is called) without copying a
    tensor: the cost of one save's bookkeeping, paid once per manager.
    """
    if not isinstance(state, Mapping) or not state:
        raise TypeError(
            "state must be a non-empty dict of name -> object, e.g. "
            "{'model': model, 'optimizer': optimizer}"
        )
    sink = TensorSink(lambda t: t)
    for name in state:
        if not isinstance(name, str) or not name or name.startswith("_"):
            raise ValueError(
                f"state names must be non-empty strings not starting with '_': {name!r}"
            )
    # Distributed, modules and optimizers are saved through DCP (sharded tensors): only the
    # rest goes through the JSON encoder.
    sharded = options is not None and options.distributed
    if sharded:
        from mlflow_ckpt.snapshot.sharded import sharded_entries

        sharded_entries(state)  # an optimizer without its module is refused here
    for name, obj in state.items():
        if not (sharded and isinstance(obj, torch.nn.Module | torch.optim.Optimizer)):
            encode(obj, name, sink)
    if options is not None and callable(options.verify) and MODEL_KEY not in state:
        raise ValueError(
            f"verify=<callable> validates the network rebuilt from state[{MODEL_KEY!r}], and "
            f"the state has no {MODEL_KEY!r} entry (it has {sorted(state)})"
        )


def _distributed_mode(value: Any) -> bool:
    """``distributed=None`` (default): distributed when a process group is initialized.
    ``False``: a manager on one rank only (rank 0 of a DDP job, say) writing single-process
    checkpoints. ``True``: distributed, or an error if there is no process group."""
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if value is None:
        return initialized
    if not isinstance(value, bool):
        raise TypeError(f"distributed must be None, True or False, not {value!r}")
    if value and not initialized:
        raise ValueError(
            "distributed=True needs an initialized process group: call "
            "torch.distributed.init_process_group() first (torchrun sets up its environment)"
        )
    return value


def _positive(name: str, value: Any, kind: type) -> None:
    if value is None:
        return
    expected = numbers.Integral if kind is int else numbers.Real
    if isinstance(value, bool) or not isinstance(value, expected):
        raise TypeError(f"{name} must be a {kind.__name__}, not {type(value).__name__}")
    # (float: typeshed's numbers.Real has no ">"; the value is finite once isfinite passed)
    if not (math.isfinite(value) and float(value) > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")


def _triggers(args: Mapping[str, Any], monitor: str | None, mode: str) -> tuple[Trigger, ...]:
    """The user's trigger objects, then those the flat keywords ask for."""
    given = args["triggers"]
    if given is None:
        given = ()
    if isinstance(given, str | bytes) or not isinstance(given, Sequence):
        raise TypeError(f"triggers must be a list of trigger objects, not {given!r}")
    triggers: list[Trigger] = list(given)
    if args["save_every_n_steps"]:
        triggers.append(EveryNSteps(int(args["save_every_n_steps"])))
    if args["save_every_n_epochs"]:
        triggers.append(EveryNEpochs(int(args["save_every_n_epochs"])))
    if args["save_every_n_seconds"] == "auto":
        triggers.append(YoungDalyInterval(float(args["mtbf_hours"])))
    elif args["save_every_n_seconds"]:
        triggers.append(EveryNSeconds(float(args["save_every_n_seconds"])))
    if monitor:
        triggers.append(BestMetric(monitor, mode))
    names: set[str] = set()
    for trigger in triggers:
        name = getattr(trigger, "name", None)
        if not callable(getattr(trigger, "fires", None)) or not isinstance(name, str):
            raise TypeError(
                f"{trigger!r} is not a trigger: it needs a str `name` and a method "
                "`fires(info: StepInfo) -> bool` (optionally `observe`, `state_dict`, "
                "`load_state_dict`); see mlflow_ckpt.manager.triggers"
            )
        if not name or "," in name:
            raise ValueError(f"trigger name {name!r} must be non-empty and without commas")
        if name in names:
            raise ValueError(
                f"two triggers are named {name!r} (a trigger object and the keyword that makes "
                "the same one?); give each trigger its own name"
            )
        names.add(name)
    return tuple(triggers)


def _retention(args: Mapping[str, Any], monitor: str | None, mode: str) -> RetentionPolicy | None:
    """The user's retention object, kept together with what the ``keep_*`` keywords ask for."""
    given = args["retention"]
    if given is not None and not callable(getattr(given, "keep", None)):
        raise TypeError(
            f"retention={given!r} is not a retention policy: it needs a method "
            "`keep(checkpoints) -> set of model IDs`; see mlflow_ckpt.manager.retention"
        )
    shorthand = build_policy(
        keep_last_n=args["keep_last_n"],
        keep_best_n=args["keep_best_n"],
        keep_every_n_steps=args["keep_every_n_steps"],
        metric=monitor,
        mode=mode,
    )
    if given is None or shorthand is None:
        return given or shorthand
    return KeepAny((given, shorthand))


def _archive(args: Mapping[str, Any], retention: RetentionPolicy | None) -> ArchiveAfterN | None:
    """``archive_after_n=K``: milestones older than the K newest go to the cold tier."""
    n = args["archive_after_n"]
    if n is None:
        return None
    archive = ArchiveAfterN(n)
    if retention is None or not any(
        isinstance(p, KeepEveryNSteps) for p in policy_members(retention)
    ):
        raise ValueError(
            "archive_after_n archives the milestones that keep_every_n_steps keeps: pass "
            "keep_every_n_steps= too (or a retention= holding KeepEveryNSteps)"
        )
    return archive


def _verify(args: Mapping[str, Any]) -> Verify:
    verify = args["verify"]
    if callable(verify):
        if args["model_factory"] is None:
            raise ValueError(
                "verify=<callable> runs on a model rebuilt from the stored checkpoint: pass "
                "model_factory= (and model_kwargs=) too"
            )
        return verify
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be 'size', 'hash' or a callable, not {verify!r}")
    return verify


def _folder_spec(args: Mapping[str, Any]) -> FolderSpec:
    try:
        kwargs = json.loads(json.dumps(dict(args["model_kwargs"] or {}), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model_kwargs must be JSON-serialisable: {exc}") from exc
    code_paths = args["code_paths"]
    if isinstance(code_paths, str | Path):
        code_paths = [code_paths]
    for path in code_paths:
        if not Path(path).exists():
            raise ValueError(f"code path {path} does not exist (code_paths=)")
    compression = args["compression"]
    if compression not in (None, "zstd"):
        raise ValueError(f"compression must be None or 'zstd', not {compression!r}")
    if compression and args["format"] != "safetensors":
        raise ValueError(
            "compression='zstd' compresses safetensors shards: use format='safetensors'"
        )
    return FolderSpec(
        format=check_format(args["format"]),
        compression=compression,
        compression_level=check_level(args["compression_level"]),
        max_shard_bytes=int(args["max_shard_bytes"]),
        model_factory=factory_path(args["model_factory"]),
        model_kwargs=kwargs,
        code_paths=tuple(str(p) for p in code_paths),
    )
