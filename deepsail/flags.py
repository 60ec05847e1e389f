"""Config dataclasses are the command line: each field, with its help, becomes a `--flag`, written once.

litgpt's rule ("the signature is the CLI"), applied to our configs: a field declared with `knob`

    lr: float = knob(3e-4, "Peak learning rate (after warmup).")

is `--lr` on every verb that takes `TrainConfig`'s options, with that help and that default. A verb declares
which config it takes with `@options(cfg=Options(TrainConfig))`, and receives the built, validated dataclass:

    @options(cfg=Options(TrainConfig, skip=("data",)))
    def pretrain_verb(cfg: TrainConfig, resume: bool = False, given: frozenset[str] = frozenset()): ...

`given` (if the verb asks for it) names the flags the user set explicitly, so `--resume` can tell "kept the
default" from "asked for the default value". Verbs that share a knob share its definition; a verb may change a
default (`deepsail run` trains for 8 minutes) but never the name or the meaning.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer


def knob(default: Any, help: str, **option: Any) -> Any:
    """A dataclass field that is also a CLI option: `help` is its --help text; `option` goes to typer.Option."""
    return field(default=default, metadata={"help": help, "option": option})


@dataclass(frozen=True)
class Options:
    """Which fields of a config dataclass a verb takes as flags, and the verb's own defaults for them."""

    cls: type
    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)  # the verb's defaults for its flags
    fixed: Mapping[str, Any] = field(default_factory=dict)  # values for fields the verb sets itself (no flag)

    def fields(self) -> list[dataclasses.Field]:
        fs = [f for f in dataclasses.fields(self.cls) if "help" in f.metadata]
        names = {f.name for f in fs}
        unknown = set(self.only or ()) | set(self.skip) | set(self.defaults) | set(self.fixed)
        assert unknown <= names, f"{self.cls.__name__} has no knobs {sorted(unknown - names)}"
        if self.only is not None:
            fs = [f for f in fs if f.name in self.only]
        return [f for f in fs if f.name not in self.skip]


def _cli_type(hint: Any) -> tuple[Any, bool]:
    """(the annotation typer understands, whether None is a legal value of the field)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    optional = type(None) in args
    if optional:
        inner = [a for a in args if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else hint
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        hint = type(args[0])  # the config validates the value and names the choices
    elif origin in (Sequence, list, tuple) or (isinstance(origin, type) and issubclass(origin, Sequence)):
        hint = list[args[0]] if args else list[str]
        optional = True  # a repeatable option given zero times
    return (hint | None) if optional else hint, optional


def options(**groups: Options) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a verb: its CLI signature becomes its own parameters plus one option per knob of each group."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for name, p in sig.parameters.items() if name not in groups and name != "given"]
        wants_given = "given" in sig.parameters
        generated: list[inspect.Parameter] = []
        plans: dict[str, list[tuple[str, bool, Any]]] = {}
        for group_name, group in groups.items():
            hints = typing.get_type_hints(group.cls)
            plans[group_name] = []
            for f in group.fields():
                annotation, optional = _cli_type(hints[f.name])
                default = group.defaults.get(f.name, f.default)
                if default is dataclasses.MISSING:
                    default = f.default_factory()  # type: ignore[misc]
                if isinstance(default, tuple):
                    default = list(default) or None
                option = typer.Option(help=f.metadata["help"], **f.metadata["option"])
                generated.append(
                    inspect.Parameter(
                        f.name,
                        inspect.Parameter.KEYWORD_ONLY,
                        default=default,
                        annotation=Annotated[annotation, option],
                    )
                )
                # None from the CLI means "not given" unless None is the field's own default (a real value then)
                plans[group_name].append((f.name, optional and f.default is None, default))

        @functools.wraps(fn)
        def verb(*args: Any, **kwargs: Any) -> Any:
            given = _given(kwargs.pop(_CTX, None), kwargs)
            built = {}
            for group_name, plan in plans.items():
                values = dict(groups[group_name].fixed)
                for name, optional, default in plan:
                    value = kwargs.pop(name, default)
                    if value is None and not optional:
                        continue  # the dataclass default
                    values[name] = tuple(value) if isinstance(value, list) else value
                built[group_name] = groups[group_name].cls(**values)
            if wants_given:
                kwargs["given"] = given
            return fn(*args, **kwargs, **built)

        # typer hands the click context to a parameter annotated typer.Context: it says which flags were typed
        ctx = [inspect.Parameter(_CTX, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=typer.Context)]
        params = own + ctx + generated
        verb.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        verb.__annotations__ = {p.name: p.annotation for p in params}
        return verb

    return wrap


_CTX = "_typer_context"


def _given(ctx: Any, kwargs: dict[str, Any]) -> frozenset[str]:
    """Parameters set explicitly: on the command line or by environment variable, else those passed in Python."""
    if ctx is None:
        return frozenset(kwargs)
    sources = {name: ctx.get_parameter_source(name) for name in kwargs}
    return frozenset(n for n, s in sources.items() if s is not None and s.name not in ("DEFAULT", "DEFAULT_MAP"))
