"""Load YAML configs with ``_base_`` inheritance and dotted overrides into frozen schemas."""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dist_reid.config.schema import ConfigError, ExperimentConfig

T = TypeVar("T")
BASE_KEY = "_base_"


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> DictConfig:
    """Read one YAML file and merge its ``_base_`` files (paths relative to it) beneath it."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{path}: {BASE_KEY} cycle: {cycle}")
    if not path.is_file():
        where = f" (named in {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    bases = raw.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create()
    for base in bases:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / base, (*chain, path)))
    return OmegaConf.merge(merged, OmegaConf.create(raw))


def _explain(exc: OmegaConfBaseException, source: str, node: DictConfig) -> ConfigError:
    """Turn an OmegaConf error into one line naming the source and the dotted key."""
    key = getattr(exc, "full_key", None) or "?"
    message = str(exc).splitlines()[0]
    if "not in" in message and "Did you mean" not in message:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(node, parent_key) if parent_key else node
        if isinstance(parent, DictConfig):
            close = difflib.get_close_matches(leaf, [str(k) for k in parent], n=1)
            if close:
                message += f" Did you mean: {close[0]!r}?"
    return ConfigError(f"{source}: {key}: {message}")


def _yaml_tags(value: str) -> list[str]:
    """The explicit YAML tags (``!!python/...``, ``!!binary``, ``!foo``) in an override's value."""
    try:
        return [t.value[0] + t.value[1] for t in yaml.scan(value) if isinstance(t, yaml.TagToken)]
    except yaml.YAMLError:
        return []  # malformed YAML: left to the parser's own error below


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        # A command line is plain values: a tag would ask the YAML loader to build an object
        # (refused by the safe loader as a traceback; here one line before anything runs).
        key, _, value = item.partition("=")
        tags = _yaml_tags(value)
        if tags:
            raise ConfigError(
                f"overrides: {key}: YAML tags are not allowed in overrides, got {tags[0]!r}"
            )
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(f"overrides: {str(exc).splitlines()[0]}") from None


def build_config(
    schema: type[T],
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    *,
    values: Mapping[str, Any] | None = None,
    source: str = "config",
) -> T:
    """Merge ``values`` (plain nested values, e.g. a checkpoint's config, named ``source`` in
    errors), ``path`` (and its bases) and ``overrides`` onto ``schema``, in that order; return
    a frozen instance."""
    node = OmegaConf.structured(schema)
    OmegaConf.set_readonly(node, False)  # frozen dataclasses give read-only nodes; we merge first
    layers: list[tuple[str, DictConfig]] = []
    if values is not None:
        layers.append((source, OmegaConf.create(dict(values))))
    if path is not None:
        layers.append((str(path), _read_yaml(Path(path), ())))
    if overrides:
        layers.append(("overrides", _parse_overrides(overrides)))
    for source, layer in layers:
        try:
            node = OmegaConf.merge(node, layer)
        except OmegaConfBaseException as exc:
            raise _explain(exc, source, node) from None
    missing = sorted(OmegaConf.missing_keys(node))
    if missing:
        source = str(path) if path is not None else "config"
        raise ConfigError(f"{source}: missing required value(s): {', '.join(missing)}")
    try:
        return OmegaConf.to_object(node)  # runs each dataclass's __post_init__ checks
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        cause = exc.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise _explain(exc, str(path or "config"), node) from None


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """Load an :class:`ExperimentConfig` from YAML plus ``key=value`` overrides."""
    return build_config(ExperimentConfig, path, overrides)


def to_yaml(cfg: Any) -> str:
    """The fully resolved config as YAML (what a run writes beside its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), sort_keys=False)


def config_hash(cfg: Any) -> str:
    """A short stable hash of the resolved config (stored in checkpoints for resume checks)."""
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def save_config(cfg: Any, directory: str | os.PathLike[str], name: str = "config.yaml") -> Path:
    """Write the resolved config into ``directory`` atomically and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, target)
    return target
