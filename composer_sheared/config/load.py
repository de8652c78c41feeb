"""Loading: the YAML file and `key=value` overrides merged into the typed TrainConfig, then the
one validation pass (composer_sheared.config.checks)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from composer_sheared.config.checks import validate
from composer_sheared.config.schema import ConfigError, Resolved, TrainConfig


def _container_clash(schema, new, prefix: str = "") -> Optional[tuple[str, str]]:
    """The first key where `new` puts a dict over a list or a list over a dict of `schema`."""
    if isinstance(new, DictConfig) and isinstance(schema, DictConfig):
        for k in new.keys():
            if k in schema and not OmegaConf.is_missing(schema, k) and not OmegaConf.is_missing(new, k):
                found = _container_clash(schema._get_node(k), new._get_node(k), f"{prefix}{k}.")
                if found:
                    return found
        return None
    kinds = {ListConfig: "a list", DictConfig: "a dict (mapping)"}
    for a, b in ((ListConfig, DictConfig), (DictConfig, ListConfig)):
        if isinstance(schema, a) and isinstance(new, b):
            return prefix.rstrip("."), f"expected {kinds[a]}, got {kinds[b]}"
    return None


def _node(cfg, key: str):
    for k in key.split("."):
        cfg = cfg._get_node(k)
    return cfg


def _merge(base, part, where: str):
    try:
        return OmegaConf.merge(base, part)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or where
        raise ConfigError(str(key), str(err).splitlines()[0]) from None
    except TypeError as err:  # omegaconf: "Cannot merge incompatible container types"
        clash = _container_clash(base, part)
        if clash and _node(base, clash[0])._metadata.ref_type is Any:
            # a field typed Any (e.g. reference_losses: list or dict) takes the new container as is
            OmegaConf.update(base, clash[0], None, merge=False)
            return _merge(base, part, where)
        raise ConfigError(*(clash or (where, str(err)))) from None


def _load_yaml(path: str):
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(path, "config file does not exist")
    try:
        return OmegaConf.load(p)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError(where, f"YAML syntax error: {err.problem or err.context}") from None
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(path, str(err).splitlines()[0]) from None


def load_config(yaml_path: Optional[str], overrides: List[str] = (), check_paths: bool = True
                ) -> tuple[TrainConfig, Resolved]:
    """YAML + `key=value` overrides -> (typed TrainConfig, Resolved); ConfigError on any problem.

    `check_paths=False` skips the data directory check (for tools that only need the config)."""
    cfg = OmegaConf.structured(TrainConfig)
    if yaml_path is not None:
        cfg = _merge(cfg, _load_yaml(yaml_path), yaml_path)
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item:
            raise ConfigError(item, "expected key=value")
        try:
            part = OmegaConf.from_dotlist([item])
        except Exception as err:  # noqa: BLE001 - yaml/omegaconf parse errors of one value
            raise ConfigError(key, f"cannot parse the value ({str(err).splitlines()[0]})") from None
        cfg = _merge(cfg, part, key)
    try:
        obj = OmegaConf.to_object(cfg)  # resolves interpolations, checks MISSING values
    except OmegaConfBaseException as err:
        raise ConfigError(str(getattr(err, "full_key", None) or yaml_path), str(err).splitlines()[0]) from None
    return obj, validate(obj, check_paths=check_paths)
