"""The one config loader of the jobs and the stage (no Ray import).

    cfg = load_config(GenerateConfig, sys.argv[1:], "conf/generate.yaml")

`argv` is `[--config FILE] [key=value ...]`: the YAML file (default `default_yaml_path`)
is merged over the dataclass schema (config.py), then the dotted overrides over that.
omegaconf checks every key and type; each dataclass's `__post_init__` checks ranges and
choices. Any problem raises `ConfigError` with one line naming the key and what was
expected; a job prints it and exits 2 before any work starts (`config_or_exit`).
"""
from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .config import ConfigError

T = TypeVar("T")


def _one_line(e: OmegaConfBaseException, schema_cls: type) -> str:
    msg = str(getattr(e, "msg", None) or e).splitlines()[0].strip()
    key = getattr(e, "full_key", None)
    if key and isinstance(e, ConfigKeyError) and "did you mean" not in msg.lower():  # suggest real keys
        msg += _did_you_mean(key, schema_cls)
    return f"{key}: {msg}" if key else msg


def leaf_keys(schema_cls: type) -> list[str]:
    """Every dotted key of a schema ("sampling.max_new_tokens", ...)."""
    def walk(node, prefix):
        for k, v in node.items():
            yield from walk(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return list(walk(OmegaConf.to_container(OmegaConf.structured(schema_cls)), ""))


def _did_you_mean(key: str, schema_cls: type) -> str:
    keys = leaf_keys(schema_cls)
    last = {k.rsplit(".", 1)[-1]: k for k in keys}
    hits = [last[key]] if key in last else difflib.get_close_matches(key, keys, n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(hits)}?" if hits else ""


def load_config(schema_cls: type[T], argv: Sequence[str], default_yaml_path: str | Path | None) -> T:
    """Schema defaults <- YAML file (--config FILE or the default) <- key=value overrides."""
    argv, yaml_path, overrides = list(argv), default_yaml_path, []
    while argv:
        arg = argv.pop(0)
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                yaml_path = arg.split("=", 1)[1]
            elif argv:
                yaml_path = argv.pop(0)
            else:
                raise ConfigError("--config: expected a YAML file path")
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: expected --config FILE or key=value")
    try:
        cfg = OmegaConf.structured(schema_cls)
        if yaml_path is not None:
            if not Path(yaml_path).is_file():
                raise ConfigError(f"--config: no such file {str(yaml_path)!r}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(yaml_path))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(cfg)  # runs each dataclass's __post_init__
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e, schema_cls)) from None
    except Exception as e:  # noqa: BLE001 - a YAML syntax error and friends: still one line
        raise ConfigError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def config_or_exit(schema_cls: type[T], argv: Sequence[str], default_yaml_path: str | Path | None) -> T:
    """load_config for a job's main: --help prints every key and exits 0; a ConfigError is
    one line on stderr and exit 2. Imports nothing heavy (no torch, no ray)."""
    if "--help" in argv or "-h" in argv:
        print(usage(default_yaml_path))
        sys.exit(0)
    try:
        return load_config(schema_cls, argv, default_yaml_path)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


def usage(default_yaml_path: str | Path | None) -> str:
    """The --help text: how to call a job, then its YAML (every key, default and meaning)."""
    script = Path(sys.argv[0]).name or "job.py"
    head = (f"usage: python {script} [--config FILE] [--dry-run] [key=value ...]\n\n"
            "Keys are dotted (sampling.max_new_tokens=64); lists as [a,b]. --dry-run checks the config,\n"
            "input and model, prepares the first rows and prints them, and writes nothing.\n"
            "input.limit=N runs only the first N rows. Keys, defaults and meaning:\n\n")
    text = Path(default_yaml_path).read_text() if default_yaml_path and Path(default_yaml_path).is_file() else ""
    return head + text


def to_dict(cfg) -> dict:
    """The resolved config as plain data (for _summary.json)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
