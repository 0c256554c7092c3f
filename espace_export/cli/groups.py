"""Option groups: typer parameters made from the options dataclasses, so each option is declared once.

A command subscribes to groups (Polygraphy's argument-group idea): ``@command(app, groups=("data", "ranks"))``
adds every field of :class:`~espace_export.options.DataOptions` and :class:`~espace_export.options.RankOptions`
as an option — its flags, help, panel and allowed values come from the field's metadata — and hands the
parsed values to the command as one ``settings`` dict, ready for ``CompressOptions.from_settings``.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from espace_export.options import group_class

# a whole group (its name in espace_export.options, or an options dataclass such as deploy.options.BuildOptions),
# or (group, [field, ...]) for some of its fields
Group = str | type | tuple[str | type, Sequence[str]]

ModelArgument = Annotated[
    Path, typer.Argument(help="The exported transformer (.onnx; external data beside it is fine).")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the JSON report to stdout instead of tables.")]


def _annotation(hint: Any, meta: typing.Mapping[str, Any]) -> Any:
    if meta.get("multiple"):
        return list[str] | None
    if "type" in meta:
        return meta["type"]
    if meta.get("choices"):
        choices: Any = typing.Literal[tuple(meta["choices"])]  # typer offers a Literal's values as the choices
        return typing.Optional[choices] if type(None) in typing.get_args(hint) else choices  # noqa: UP045
    return hint


def _group_class(group: Group) -> type:
    name = group[0] if isinstance(group, tuple) else group
    return group_class(name) if isinstance(name, str) else name


def group_fields(group: Group) -> list[dataclasses.Field[Any]]:
    """A group's command-line fields (all of them, or the named ones)."""
    only = group[1] if isinstance(group, tuple) else None
    return [
        field
        for field in dataclasses.fields(_group_class(group))
        if field.metadata and field.metadata.get("cli") is not False and (only is None or field.name in only)
    ]


def group_parameters(group: Group) -> list[inspect.Parameter]:
    """The typer parameters of a group's fields (all of them, or the named ones)."""
    hints = typing.get_type_hints(_group_class(group))
    parameters = []
    for field in group_fields(group):
        meta = field.metadata
        info = typer.Option(
            *meta.get("flags", ()),
            help=escape(meta["help"]),  # rich markup would eat "[default: ...]"
            rich_help_panel=meta.get("panel"),
            show_default=not meta.get("multiple"),
        )
        default = None if meta.get("multiple") else field.default
        annotation: Any = Annotated[_annotation(hints[field.name], meta), info]  # type: ignore[misc]
        parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation))  # fmt: skip
    return parameters


def command(app: typer.Typer, *, groups: Sequence[Group], **settings: Any) -> Callable[[Callable[..., Any]], Any]:
    """Register ``function`` as a command with its own parameters plus the options of ``groups``; it is called
    with its own parameters and ``settings``: the group options as a dict (``exclude`` as a tuple)."""

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(function, eval_str=True).parameters.values()
            if p.name != "settings"
        ]
        grouped = [p for group in groups for p in group_parameters(group)]
        names = {p.name for p in grouped}
        repeatable = {field.name for group in groups for field in group_fields(group) if field.metadata.get("multiple")}

        def callback(**kwargs: Any) -> Any:
            chosen = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
            for name in repeatable & chosen.keys():  # repeatable options arrive as a list or None
                chosen[name] = tuple(chosen[name] or ())
            return function(settings=chosen, **kwargs)

        callback.__signature__ = inspect.Signature(own + grouped)  # type: ignore[attr-defined]
        callback.__name__, callback.__doc__ = function.__name__, function.__doc__
        callback.__module__ = function.__module__
        app.command(**settings)(callback)
        return function

    return register


def progress_wanted(quiet: bool, json_out: bool) -> bool:
    return not (quiet or json_out) and sys.stderr.isatty()
