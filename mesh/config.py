"""Configuration: defaults < TOML file (``--config``) < ``MESH_*`` environment < flags.

``resolve`` is pure: it takes plain dicts and returns plain values, or raises ConfigError
with one line naming the flag and what is wrong. The CLI prints that line and exits 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "MESH_"


class ConfigError(ValueError):
    """A bad flag, environment variable or config file value. The message is one line."""


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: flag ``--name``, env ``MESH_NAME``, file key ``name`` (dashes or underscores)."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    repeat: bool = False
    metavar: str | None = None

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name


# Value parsers. Each takes a string (flag, env) or a native TOML value and returns the
# parsed value or raises ValueError with the reason; resolve() adds where it came from.


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def integer(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            if isinstance(value, bool | float):
                raise ValueError
            n = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be an integer {lo}-{hi}, got {value!r}") from None
        if not lo <= n <= hi:
            raise ValueError(f"must be an integer {lo}-{hi}, got {n}")
        return n

    return parse


def number(lo: float, hi: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            if isinstance(value, bool):
                raise ValueError
            x = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number {lo:g}-{hi:g}, got {value!r}") from None
        if not lo <= x <= hi or x != x:
            raise ValueError(f"must be a number {lo:g}-{hi:g}, got {value!r}")
        return x

    return parse


def choice(*values: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in values:
            raise ValueError(f"must be one of {', '.join(values)}, got {value!r}")
        return str(value)

    return parse


def ip_address(value: Any) -> str:
    """An IPv4 or IPv6 address, normalised."""
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ValueError(f"must be an IP address, got {value!r}") from None


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def host_port(value: Any) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; the host must be an IP address (no lookups at startup)."""
    if not isinstance(value, str):
        raise ValueError(f"must be HOST:PORT, got {value!r}")
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if host != "localhost":
            raise ValueError(f"host must be an IP address, got {value!r}") from None
        host = "127.0.0.1"
    try:
        port_n = int(port)
    except ValueError:
        raise ValueError(f"port must be an integer 0-65535, got {value!r}") from None
    if not 0 <= port_n <= 65535:
        raise ValueError(f"port must be an integer 0-65535, got {value!r}")
    return host, port_n


def format_host_port(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Resolution


def _source_values(opt: Option, value: Any, *, from_env: bool) -> list[Any]:
    if not opt.repeat:
        return [value]
    if from_env:
        return [v.strip() for v in str(value).split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _parse(opt: Option, value: Any, source: str, *, from_env: bool = False) -> Any:
    try:
        if opt.repeat:
            return tuple(opt.parse(v) for v in _source_values(opt, value, from_env=from_env))
        return opt.parse(value)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def resolve(
    options: Iterable[Option],
    *,
    file: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    file_name: str = "config file",
    extra_file_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Merge the four layers into ``{key: value}``. Raises ConfigError on the first bad value."""
    options = list(options)
    file = {k.replace("-", "_"): v for k, v in (file or {}).items()}
    env = env or {}
    flags = flags or {}
    known = {o.key for o in options} | {k.replace("-", "_") for k in extra_file_keys}
    for key in file:
        if key not in known:
            raise ConfigError(f"{file_name}: unknown key {key!r}")
    out: dict[str, Any] = {}
    for opt in options:
        if opt.key in flags and flags[opt.key] is not None:
            out[opt.key] = _parse(opt, flags[opt.key], opt.flag)
        elif env.get(opt.env, "") != "":
            out[opt.key] = _parse(opt, env[opt.env], opt.env, from_env=True)
        elif opt.key in file:
            out[opt.key] = _parse(opt, file[opt.key], f"{file_name}: {opt.key}")
        else:
            out[opt.key] = opt.default
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """Add each option as a flag whose absence is visible (default SUPPRESS)."""
    for opt in options:
        default = opt.default
        if isinstance(default, tuple) and default and isinstance(default[0], tuple):
            default = ",".join(format_host_port(d) for d in default)
        elif isinstance(default, tuple) and len(default) == 2 and isinstance(default[1], int):
            default = format_host_port(default)
        shown = "" if default in (None, (), "") else f" (default: {default})"
        parser.add_argument(
            opt.flag,
            dest=opt.key,
            action="append" if opt.repeat else "store",
            default=argparse.SUPPRESS,
            metavar=opt.metavar,
            help=f"{opt.help}{shown} [env {opt.env}]",
        )


def from_namespace(
    options: Iterable[Option],
    ns: argparse.Namespace,
    env: Mapping[str, str],
    *,
    config_path: str | None = None,
    extra_file_keys: Sequence[str] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Resolve the options of a parsed command line. Returns (values, the whole file)."""
    file = load_toml(config_path) if config_path else {}
    values = resolve(
        options,
        file=file,
        env=env,
        flags=vars(ns),
        file_name=str(config_path or "config file"),
        extra_file_keys=extra_file_keys,
    )
    return values, file
