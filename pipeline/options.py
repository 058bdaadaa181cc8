"""Options declared once: a stage's config dataclass is also its command line.

A field made with :func:`option` carries its help text, its flags (default: ``--`` and the
field's name with dashes) and what the command line checks (typer's ``min``, ``max``);
:mod:`rdkd.cli` builds each command's options from these fields, so an option's name,
default and help live in the dataclass alone, and the config a stage records is the one
the command line filled. A field whose command-line value needs converting (``"0.08,1.0"``
to a pair, ``TERM=VALUE`` words to a dict) names its ``parse`` and the command-line type;
a field made with ``argument=True`` is a positional argument instead of an option; a field
that holds another config (:func:`nested`) is offered as that config's options. Fields made
with plain ``dataclasses.field`` are not options.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class CliOption:
    """How a config field appears on the command line."""

    help: str
    flags: tuple[str, ...] = ()
    checks: dict = dataclasses.field(default_factory=dict)  # typer's min=, max=
    parse: Callable[[Any], Any] | None = None  # command-line value -> field value
    cli_type: Any = None  # the command-line type, when it is not the field's
    cli_default: Any = None  # the command-line default, when ``has_cli_default``
    has_cli_default: bool = False
    argument: bool = False  # a positional argument (no flags) rather than an option


def option(default: Any = ..., help: str = "", *flags: str, factory: Callable[[], Any] | None = None,
           parse: Callable[[Any], Any] | None = None, cli_type: Any = None, cli_default: Any = MISSING,
           argument: bool = False, **checks: Any) -> Any:
    """A dataclass field that is also a command-line option; ``default`` ``...`` (or none):
    a required one. ``flags``: its names on the command line (typer's spelling, e.g.
    ``"--stream/--no-stream"``); ``checks``: typer's ``min``, ``max``; ``argument``: a
    positional argument (no flags; a list type takes every remaining word)."""
    if argument and flags:
        raise ValueError("a positional argument has no flags")
    metadata = {"cli": CliOption(help, flags, checks, parse, cli_type, None if cli_default is MISSING else cli_default,
                                 cli_default is not MISSING, argument)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    if default is ...:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def nested(factory: Callable[[], Any]) -> Any:
    """A field holding another config whose own options stand on the command line."""
    return dataclasses.field(default_factory=factory, metadata={"cli_nested": True})


@dataclass(frozen=True)
class CliField:
    """One option of a command: the config class and field it fills, and how."""

    owner: type
    name: str
    annotation: Any
    default: Any  # ...: required
    cli: CliOption

    @property
    def flags(self) -> tuple[str, ...]:
        return self.cli.flags or ("--" + self.name.replace("_", "-"),)


def cli_fields(config_cls: type) -> Iterator[CliField]:
    """The options of ``config_cls``, nested configs' options in place of their field."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("cli_nested"):
            yield from cli_fields(hints[f.name])
        elif "cli" in f.metadata:
            cli = f.metadata["cli"]
            if cli.has_cli_default:
                default = cli.cli_default
            elif f.default is not MISSING:
                default = f.default
            elif f.default_factory is not MISSING:
                default = f.default_factory()
            else:
                default = ...
            yield CliField(config_cls, f.name, cli.cli_type or hints[f.name], default, cli)


def config_values(config_cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``config_cls`` that command-line ``values`` (by field name) fill,
    parsed where a field says how, nested configs built: keyword arguments of the config
    or of the stage function that makes it."""
    hints = typing.get_type_hints(config_cls)
    kwargs = {}
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("cli_nested"):
            kwargs[f.name] = hints[f.name](**config_values(hints[f.name], values))
        elif "cli" in f.metadata and f.name in values:
            parse = f.metadata["cli"].parse
            kwargs[f.name] = parse(values[f.name]) if parse is not None else values[f.name]
    return kwargs
