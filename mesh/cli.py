"""The ``mesh`` command. Each subcommand is a :class:`Command` in its own module.

A user mistake (bad flag, bad value, unreachable registry for ``ls``) prints one line and
exits 2; nothing a user types produces a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from mesh import __version__
from mesh.config import ConfigError, Option, add_options, from_namespace

EXIT_USAGE = 2


@dataclass(frozen=True, slots=True)
class Command:
    """A subcommand: its options (flag, env, file key), extra argparse setup and its runner."""

    name: str
    help: str
    options: tuple[Option, ...]
    run: Callable[[dict[str, Any], argparse.Namespace], int]
    setup: Callable[[argparse.ArgumentParser], None] | None = None
    config_file: bool = True  # accepts --config FILE
    extra_file_keys: tuple[str, ...] = field(default=())
    passthrough: bool = False  # takes ``-- ARGS`` as ns.passthrough (another parser's flags)


# Subcommand modules, in the order `mesh --help` lists them. Each exposes COMMAND.
COMMAND_MODULES = (
    "mesh.cmd_demo",
    "mesh.cmd_up",
    "mesh.cmd_sidecar",
    "mesh.cmd_lb",
    "mesh.cmd_db",
    "mesh.cmd_ls",
    "mesh.cmd_resolve",
    "mesh.cmd_admin",
    "mesh.cmd_k8s",
)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _named(argv: Sequence[str]) -> str | None:
    """The subcommand module ``argv`` names, if any: a command line imports only its own
    command's module (``mesh admin``, a probe run every few seconds, starts in a fraction
    of the time that importing the sidecar and the LB takes)."""
    args = iter(argv)
    for arg in args:
        if arg == "--log-level":
            next(args, None)
        elif not arg.startswith("-"):
            module = f"mesh.cmd_{arg}"
            return module if module in COMMAND_MODULES else None
    return None


def _commands(only: str | None = None) -> list[Command]:
    out = []
    for name in COMMAND_MODULES if only is None else (only,):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # not built yet
            raise
        out.append(module.COMMAND)
    return out


def build_parser(only: str | None = None) -> tuple[Parser, dict[str, Command]]:
    parser = Parser(prog="mesh", description="Service-mesh sidecar, DNS and L7 load balancer.")
    parser.add_argument("--version", action="version", version=f"mesh {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="log level (default: info) [env MESH_LOG_LEVEL]",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands = {}
    for cmd in _commands(only):
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.config_file:
            p.add_argument(
                "--config", metavar="FILE", help="TOML file of settings [env MESH_CONFIG]"
            )
        add_options(p, cmd.options)
        if cmd.setup:
            cmd.setup(p)
        commands[cmd.name] = cmd
    return parser, commands


def parse(
    argv: Sequence[str], env: dict[str, str] | None = None
) -> tuple[Command, dict[str, Any], argparse.Namespace]:
    """Parse and resolve a command line without running it (used by the compose checks)."""
    env = dict(os.environ if env is None else env)
    only = _named(argv)
    parser, commands = build_parser(only)
    argv, rest = list(argv), []
    if only is not None and "--" in argv and next(iter(commands.values())).passthrough:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1 :]
    ns = parser.parse_args(argv)
    ns.passthrough = rest
    if not ns.command:
        parser.print_help(sys.stderr)
        parser.exit(EXIT_USAGE)
    cmd = commands[ns.command]
    config_path = getattr(ns, "config", None) or (
        env.get("MESH_CONFIG") if cmd.config_file else None
    )
    try:
        values, file = from_namespace(
            cmd.options, ns, env, config_path=config_path, extra_file_keys=cmd.extra_file_keys
        )
    except ConfigError as exc:
        parser.exit(EXIT_USAGE, f"mesh {cmd.name}: error: {exc}\n")
    ns.config_file = file
    return cmd, values, ns


def main(argv: Sequence[str] | None = None) -> int:
    from mesh import logsetup

    try:
        import mesh_native  # noqa: F401  (the LB and the tables need it: fail here, in one line)
    except ImportError as exc:
        print(f"mesh: error: {exc}", file=sys.stderr)
        return 1
    cmd, values, ns = parse(sys.argv[1:] if argv is None else argv)
    logsetup.setup(ns.log_level)
    try:
        return cmd.run(values, ns)
    except ConfigError as exc:
        print(f"mesh {cmd.name}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
