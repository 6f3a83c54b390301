"""DeepSpeed ZeRO behind the engine's backend interface (architecture decision 1).

``train.backend: deepspeed`` with ``train.deepspeed_config: configs/deepspeed/zero2_bf16.json``.
The process group comes from the usual environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so ``deepspeed``, ``torchrun``, ``accelerate launch`` and ``srun`` (with those
variables exported per task) all work; a bare ``python`` run is a group of one.

Checkpoints: ZeRO stages 1 and 2 only. The trainer's single ``last.pt`` stays the one resume
file: the module weights (full on every rank under ZeRO-1/2), and under ``"optimizer"`` every
rank's ZeRO partition (fp32 master weights, optimizer moments, loss-scaler state) gathered to
rank 0, each as tensors and plain containers (``to_plain``): DeepSpeed's Python objects (the
loss scaler, enums, slice addresses) become their plain values, and resume sets those values on
copies of this run's own live objects (``from_plain``), so the file is read with
``weights_only=True`` and nothing in it can run code. Progress, RNG and config hash are saved by
the trainer as for any backend. Resume restores the fp32 masters from those partitions (no bf16
rounding), so it is exact; it needs the same world size and DeepSpeed config as the run that saved. ZeRO-3 (params
partitioned inside the module) would need DeepSpeed's own checkpoint layout and is refused.

On CPU DeepSpeed JIT-compiles a shared-memory collective op on first init (about a minute);
it is skipped (gloo collectives are used instead) unless ``DIST_REID_DS_SHM=1``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import enum
import importlib
import json
import os
import socket
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_reid.engine.distributed import (
    PrecisionChoice,
    TrainingBackend,
    launcher_precision,
    resolve_precision,
)

_PRECISION_KEYS = ("bf16", "fp16")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_deepspeed_config(
    source: str | os.PathLike[str] | dict[str, Any],
    *,
    mixed_precision: str = "auto",
    grad_accum: int = 1,
    grad_clip: float | None = None,
    micro_batch: int = 1,
    launcher: str | None = None,
) -> dict[str, Any]:
    """Read a DeepSpeed JSON config and fill its ``"auto"`` values from ours.

    ``"auto"`` is accepted for ``gradient_accumulation_steps`` (train.grad_accum),
    ``gradient_clipping`` (optim.grad_clip, 0 = off), ``train_micro_batch_size_per_gpu`` and
    ``bf16.enabled`` / ``fp16.enabled`` (train.mixed_precision; with train.mixed_precision
    ``auto``, the launcher's setting ``launcher``, else off). The batch itself always comes
    from our sampler; DeepSpeed's batch sizes only feed its own throughput logs.
    """
    return _load_deepspeed_config(
        source,
        mixed_precision=mixed_precision,
        grad_accum=grad_accum,
        grad_clip=grad_clip,
        micro_batch=micro_batch,
        launcher=launcher,
    )[0]


def _load_deepspeed_config(
    source: str | os.PathLike[str] | dict[str, Any],
    *,
    mixed_precision: str,
    grad_accum: int,
    grad_clip: float | None,
    micro_batch: int,
    launcher: str | None,
) -> tuple[dict[str, Any], PrecisionChoice]:
    """``load_deepspeed_config`` and the precision it settles, with what decided it."""
    if isinstance(source, dict):
        cfg, where = copy.deepcopy(source), "deepspeed config"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"train.deepspeed_config: {path} does not exist")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"train.deepspeed_config: {path} is not valid JSON: {exc}") from None
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2):
        raise ValueError(
            f"{where}: zero_optimization.stage={stage} is not supported (dist-reid checkpoints "
            "need the full module on every rank: use stage 1 or 2)"
        )
    if cfg.get("train_batch_size", "auto") == "auto":
        cfg.pop("train_batch_size", None)  # derived by DeepSpeed from micro x accum x world
    if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        cfg["train_micro_batch_size_per_gpu"] = micro_batch
    if cfg.get("gradient_accumulation_steps", "auto") == "auto":
        cfg["gradient_accumulation_steps"] = grad_accum
    elif cfg["gradient_accumulation_steps"] != grad_accum:
        raise ValueError(
            f"{where}: gradient_accumulation_steps={cfg['gradient_accumulation_steps']} but "
            f"train.grad_accum={grad_accum}; set one of them to 'auto'/the same value"
        )
    if cfg.get("gradient_clipping", "auto") == "auto":
        cfg["gradient_clipping"] = float(grad_clip or 0.0)
    choice = _settle_precision(cfg, where, mixed_precision, launcher)
    return cfg, choice


def _settle_precision(
    cfg: dict[str, Any], where: str, mixed_precision: str, launcher: str | None
) -> PrecisionChoice:
    """Fill the JSON's ``"enabled": "auto"`` precision sections (in place) and say what decided.

    DeepSpeed owns the precision: an explicit train.mixed_precision must agree with the JSON;
    with ``auto`` a JSON that enables bf16/fp16 (or enables neither and says no ``"auto"``)
    decides, and only ``"auto"`` sections follow the launcher."""
    sections = {key: cfg[key] for key in _PRECISION_KEYS if cfg.get(key) is not None}
    open_keys = [key for key, section in sections.items() if section.get("enabled") == "auto"]
    fixed_on = [
        key for key, section in sections.items() if key not in open_keys and section.get("enabled")
    ]
    if mixed_precision != "auto":
        wanted = resolve_precision(mixed_precision, launcher)
    elif open_keys and not fixed_on:
        wanted = resolve_precision("auto", launcher)
    else:
        wanted = None  # the JSON decides
    for key in open_keys:
        sections[key]["enabled"] = wanted is not None and wanted.precision == key
    enabled = {key: bool(sections.get(key, {}).get("enabled", False)) for key in _PRECISION_KEYS}
    if enabled["bf16"] and enabled["fp16"]:
        raise ValueError(f"{where}: bf16 and fp16 are both enabled")
    config_precision = "bf16" if enabled["bf16"] else "fp16" if enabled["fp16"] else "no"
    if wanted is not None and wanted.precision != config_precision:
        raise ValueError(
            f"train.mixed_precision={mixed_precision!r} but {where} enables {config_precision!r}: "
            "DeepSpeed owns the precision; make them agree (or use 'auto' in the JSON, or "
            "train.mixed_precision=auto to follow the JSON)"
        )
    if wanted is not None:
        return wanted
    warning = None
    if launcher is not None and launcher != config_precision:
        warning = (
            f"accelerate launch --mixed_precision {launcher} is ignored: the DeepSpeed config "
            f"{where} decides ({config_precision})"
        )
    return PrecisionChoice(config_precision, f"from the DeepSpeed config {where}", warning)


# Tag of a plain dict standing for a Python object; its value says which kind.
_TAG = "__dist_reid_plain__"
_SCALARS = (bool, int, float, str, type(None), torch.dtype, torch.Size)


def to_plain(obj: Any, where: str = "state") -> Any:
    """DeepSpeed optimizer state as tensors (on CPU), scalars and plain lists/tuples/dicts, which
    ``torch.load(weights_only=True)`` reads back. Enums become their value, dataclasses and
    named tuples their fields, other objects (the loss scaler) their attribute dict; each is
    tagged so ``from_plain`` can put it back onto the live object it came from."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, enum.Enum):
        return {_TAG: "enum", "class": type(obj).__qualname__, "value": obj.value}
    if isinstance(obj, _SCALARS):
        return obj
    if dataclasses.is_dataclass(obj) or (isinstance(obj, tuple) and hasattr(obj, "_fields")):
        fields = (
            {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
            if dataclasses.is_dataclass(obj)
            else obj._asdict()
        )
        return {
            _TAG: "fields",
            "class": type(obj).__qualname__,
            "values": {k: to_plain(v, f"{where}.{k}") for k, v in fields.items()},
        }
    if isinstance(obj, list | tuple):
        return type(obj)(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, dict):
        if not all(isinstance(k, str | int) for k in obj):
            raise TypeError(f"{where}: dict keys must be str or int to checkpoint safely")
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if hasattr(obj, "__dict__") and not callable(obj):
        return {
            _TAG: "object",
            "class": type(obj).__qualname__,
            "attrs": {k: to_plain(v, f"{where}.{k}") for k, v in vars(obj).items()},
        }
    raise TypeError(f"{where}: cannot checkpoint a {type(obj).__qualname__} safely")


def _tagged(value: Any) -> bool:
    return isinstance(value, dict) and _TAG in value


def _same_class(saved: dict[str, Any], live: Any, where: str) -> None:
    if type(live).__qualname__ != saved.get("class"):
        raise ValueError(
            f"{where}: the checkpoint has a {saved.get('class')!r} where this run has a "
            f"{type(live).__qualname__!r} (resume with the DeepSpeed config that saved it)"
        )


def from_plain(saved: Any, live: Any, where: str = "state") -> Any:
    """Undo ``to_plain`` using ``live`` (the same state of this run) as the template: tagged
    entries are rebuilt only as the live object's own class, objects as a shallow copy of the
    live one with just its existing attributes set. Nothing is looked up by a name from the
    file, so a tampered file can at most hold wrong numbers."""
    if _tagged(saved):
        kind = saved[_TAG]
        _same_class(saved, live, where)
        if kind == "enum":
            return type(live)(saved["value"])
        if kind == "fields":
            values = saved["values"]
            current = (
                {f.name: getattr(live, f.name) for f in dataclasses.fields(live)}
                if dataclasses.is_dataclass(live)
                else live._asdict()
            )
            if set(values) != set(current):
                raise ValueError(f"{where}: fields {sorted(values)} != {sorted(current)}")
            return type(live)(
                **{k: from_plain(v, current[k], f"{where}.{k}") for k, v in values.items()}
            )
        if kind == "object":
            restored = copy.copy(live)
            own = vars(live)
            for key, value in saved["attrs"].items():
                if key.startswith("__") or key not in own:
                    raise ValueError(f"{where}: {type(live).__qualname__} has no attribute {key!r}")
                setattr(restored, key, from_plain(value, own[key], f"{where}.{key}"))
            return restored
        raise ValueError(f"{where}: unknown entry kind {kind!r}")
    if isinstance(saved, torch.Tensor) and isinstance(live, torch.Tensor):
        return saved.to(live.device)  # saved on CPU; e.g. a scaler's tensor lives on the GPU
    if not isinstance(live, (torch.Tensor, *_SCALARS, list, tuple, dict)):
        # the live state has an object here: a bare value in its place is not our layout
        raise ValueError(f"{where}: the checkpoint has no {type(live).__qualname__} here")
    if isinstance(saved, dict):
        template = live if isinstance(live, dict) else {}
        # keys this rank lacks (another rank's parameter names) take a sibling as the template
        sibling = next(iter(template.values()), None)
        out = {
            k: from_plain(v, template.get(k, sibling if _tagged(v) else None), f"{where}[{k!r}]")
            for k, v in saved.items()
        }
        return OrderedDict(out) if isinstance(live, OrderedDict) else out
    if isinstance(saved, list | tuple):
        template = live if isinstance(live, list | tuple) else ()
        items = [
            from_plain(v, template[i] if i < len(template) else None, f"{where}[{i}]")
            for i, v in enumerate(saved)
        ]
        return type(saved)(items)
    return saved


class _PartitionedOptimizer:
    """The DeepSpeed optimizer as the trainer sees it: ``param_groups`` etc. pass through;
    ``state_dict`` gathers every rank's ZeRO partition to rank 0 (collective: every rank calls
    it, as the trainer does) and ``load_state_dict`` picks them back up."""

    def __init__(self, backend: DeepSpeedBackend) -> None:
        self._backend = backend

    @property
    def _inner(self) -> Any:
        return self._backend.engine.optimizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._backend.engine.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        mine = to_plain(self._inner.state_dict(), "deepspeed optimizer state")
        b = self._backend
        if b.world_size == 1:
            parts = [mine]
        else:
            parts = [None] * b.world_size if b.is_main else None
            torch.distributed.gather_object(mine, parts, dst=0)
        return {"deepspeed_zero_partitions": parts, "world_size": b.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        b = self._backend
        parts = state.get("deepspeed_zero_partitions")
        if parts is None:
            raise ValueError(
                "optimizer state was not written by the deepspeed backend "
                "(train.backend must match the run that saved it)"
            )
        if any(isinstance(p, torch.Tensor) for p in parts):
            # the layout of older versions: loading those bytes would unpickle them
            raise ValueError(
                "its DeepSpeed optimizer state is pickled bytes, which are refused (unpickling "
                "could run code); it cannot be resumed, its weights still evaluate"
            )
        if len(parts) != b.world_size:
            raise ValueError(
                f"it holds ZeRO partitions of {len(parts)} ranks but this run has "
                f"{b.world_size}: resume with the same number of processes"
            )
        if not all(isinstance(p, dict) for p in parts):
            raise ValueError("its DeepSpeed optimizer partitions are not state dicts")
        live = self._inner.state_dict()  # the template: this run's own objects and classes
        states = [from_plain(p, live, f"ZeRO partition {i}") for i, p in enumerate(parts)]
        self._inner.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)


class DeepSpeedBackend(TrainingBackend):
    """``deepspeed.initialize`` with a client optimizer (the trainer's parameter groups and lr
    schedule stay ours); precision, ZeRO stage and clipping come from the DeepSpeed config."""

    name = "deepspeed"

    def __init__(
        self,
        config: str | os.PathLike[str] | dict[str, Any] | None = None,
        mixed_precision: str = "auto",
        grad_accum: int = 1,
        grad_clip: float | None = None,
        micro_batch: int = 1,
        timeout_s: float | None = None,
        init_timeout_s: float | None = None,
    ) -> None:
        if config is None:
            raise ValueError("train.deepspeed_config: required when train.backend is 'deepspeed'")
        self.config, choice = _load_deepspeed_config(
            config,
            mixed_precision=mixed_precision,
            grad_accum=grad_accum,
            grad_clip=grad_clip,
            micro_batch=micro_batch,
            launcher=launcher_precision(),
        )
        self.precision = choice.precision  # what the JSON enables, once filled and checked
        # A bare `python` run: a group of one on a free local port.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            if os.environ.get("DIST_REID_DS_SHM", "0") != "1":
                # `import deepspeed.comm.torch as m` would bind the real torch (name shadowing),
                # so patch through importlib.
                importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        import deepspeed

        timeout = {"timeout": datetime.timedelta(seconds=init_timeout_s)} if init_timeout_s else {}
        deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False, **timeout)
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        expected = int(os.environ["WORLD_SIZE"])
        if self.world_size != expected:
            raise RuntimeError(
                f"deepspeed group has {self.world_size} ranks but WORLD_SIZE={expected}"
            )
        self.timeout_s, self.init_timeout_s = timeout_s, init_timeout_s
        self.set_timeout(init_timeout_s)  # also when the group existed already (not ours)
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        self.engine: Any = None
        self.announce_precision(choice)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        import deepspeed

        model = model.to(self.device)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=copy.deepcopy(self.config)
        )
        self.engine = engine
        dtype = self.compute_dtype
        if dtype != torch.float32:
            # The engine's parameters are bf16/fp16 while the loop hands it fp32 images and
            # some layers compute in fp32 on purpose (GeM pooling): every layer that holds
            # low-precision parameters casts its floating inputs to their dtype.
            for module in engine.module.modules():
                own = list(module.parameters(recurse=False))
                if own and all(p.dtype == dtype for p in own):
                    module.register_forward_pre_hook(self._cast_inputs)
        return engine, _PartitionedOptimizer(self)

    def _cast_inputs(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            a.to(self.compute_dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args
        )

    def accumulate(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine counts micro-steps itself

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine's module already holds bf16/fp16 weights

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/accum and by the fp16 loss scale

    def clip(self, model: nn.Module, max_norm: float) -> None:
        """No-op: DeepSpeed clips inside ``step`` (``gradient_clipping``, filled from
        ``optim.grad_clip`` when the JSON says "auto")."""

    def step(self, optimizer: Any) -> bool:
        boundary = bool(self.engine.is_gradient_accumulation_boundary())
        self.engine.step()  # steps and zeroes gradients at the boundary only
        return boundary

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if hasattr(model, "module") else model

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()
