"""Options from dataclasses: hyperparameters and settings are declared once, as dataclass fields with their help
text in the field's metadata, and turned into command-line options here (`mara-hf train` builds its options from
`TrainConfig` and `SACConfig`, `mara-hf train` and `mara-hf eval` their Ray options from `RayConfig`).

```python
>>> import argparse
>>> from dataclasses import dataclass, field
>>> from mara_hf.options import add_config_arguments, config_from_args, config_to_argv
>>> @dataclass
... class Demo:
...     steps: int = field(default=3, metadata={"help": "how many steps"})
...     mode: str = field(default="fast", metadata={"help": "how", "flag": "--run-mode"})
>>> parser = argparse.ArgumentParser()
>>> add_config_arguments(parser, Demo)
>>> config = config_from_args(Demo, parser.parse_args(["--steps", "5"]))
>>> config, config_to_argv(config)
(Demo(steps=5, mode='fast'), ['--steps', '5'])

```
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing


def _hyperparameters(config_class) -> list[tuple[dataclasses.Field, object, object]]:
    """`(field, type, default)` of every field of the dataclass `config_class` that has a `help` (a nested config
    has none)."""
    hints, defaults = typing.get_type_hints(config_class), config_class()
    return [(f, hints[f.name], getattr(defaults, f.name)) for f in dataclasses.fields(config_class)
            if "help" in f.metadata]


def _flag(field: dataclasses.Field, default=None) -> str:
    if "flag" in field.metadata:
        return field.metadata["flag"]
    return ("--no-" if default is True else "--") + field.name.replace("_", "-")


def _value_type(hint):
    """`X` of `X | None`; other types as they are."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def add_config_arguments(group, config_class, prefix: str = "") -> None:
    """One option per hyperparameter of the dataclass `config_class` (`TrainConfig`, `SACConfig`), built from each
    field: the flag (`--field-name`, or metadata `flag`; a bool that defaults to true is `--no-field-name`), its
    type (a `Literal` gives choices, `tuple[int, ...]` / `tuple[int, int]` several values), its default and its
    metadata `help`. Metadata `same_as` gives an option no default of its own (it follows another field), `none`
    the command-line spelling of None, `default_text` how the default is shown. Values land in
    `args.<prefix><field name>`; [`config_from_args`] builds the dataclass back."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for field, hint, default in _hyperparameters(config_class):
        meta, hint = field.metadata, _value_type(hint)
        if hint is bool:
            group.add_argument(_flag(field, default), dest=prefix + field.name, help=meta["help"],
                               action="store_false" if default else "store_true")
            continue
        options, shown = {"type": hint, "default": default}, meta.get("default_text", default)
        if typing.get_origin(hint) is typing.Literal:
            options.update(type=str, choices=list(typing.get_args(hint)))
        elif typing.get_origin(hint) is tuple:
            items = typing.get_args(hint)
            options.update(type=items[0], nargs="+" if items[-1] is Ellipsis else len(items), default=list(default))
            shown = " ".join(map(str, default))
        if "same_as" in meta:
            options["default"], shown = None, _flag(fields[meta["same_as"]])
        flag = _flag(field)
        group.add_argument(flag, dest=prefix + field.name, metavar=flag[2:].upper().replace("-", "_"),
                           help=f"{meta['help']} (default: {shown})".replace("%", "%%"), **options)


def config_from_args(config_class, args: argparse.Namespace, prefix: str = "", **values):
    """The dataclass `config_class` from the options [`add_config_arguments`] added (plus `values`, e.g. a nested
    config). A bad value raises the dataclass's own `ValueError`, prefixed with the option's flag."""
    found = {}
    for field, hint, default in _hyperparameters(config_class):
        value = getattr(args, prefix + field.name)
        if isinstance(value, list):
            value = tuple(value)
        if "none" in field.metadata and value == _value_type(hint)(field.metadata["none"]):
            value = None  # e.g. --initial-accept 0
        found[field.name] = value
    followed = {}  # field -> the field whose value it took (`same_as`), for the messages
    for field, _, _ in _hyperparameters(config_class):
        if found[field.name] is None and "same_as" in field.metadata:
            found[field.name] = found[field.metadata["same_as"]]
            followed[field.name] = field.metadata["same_as"]
    try:
        return config_class(**found, **values)
    except ValueError as err:
        named = re.match(r"`(\w+)`", str(err))
        fields = {f.name: f for f in dataclasses.fields(config_class)}
        if named is None or named[1] not in fields:
            raise
        name = named[1]
        if name in followed:  # the value the caller gave is the other option's
            name = followed[name]
            err = re.sub(r"`\w+`", f"`{name}`", str(err), count=1)
        raise ValueError(f"{_flag(fields[name])}: {err}") from None


def config_to_argv(config) -> list[str]:
    """The `mara-hf train` options that give `config` (a `TrainConfig` with its `sac`, or a `SACConfig`): one
    per hyperparameter that differs from its default, so `config_from_args` of their parse is `config` again."""
    argv = []
    for field, hint, default in _hyperparameters(type(config)):
        value, meta = getattr(config, field.name), field.metadata
        if "same_as" in meta:
            default = getattr(config, meta["same_as"])
        if value == default:
            continue
        if _value_type(hint) is bool:
            argv.append(_flag(field, default))
        elif value is None:
            if "none" not in meta:
                raise ValueError(f"`{field.name}` = None has no command-line spelling ({_flag(field)}).")
            argv += [_flag(field), meta["none"]]
        else:
            argv += [_flag(field), *(map(str, value) if isinstance(value, tuple) else [str(value)])]
    for field in dataclasses.fields(config):
        if dataclasses.is_dataclass(getattr(config, field.name)):  # the learner's options after the run's
            argv += config_to_argv(getattr(config, field.name))
    return argv
