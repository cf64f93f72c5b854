"""Command-line flags generated from the typed config (core/train_config.py): one source for each key's
help text, type, range, choices and default.

    @config_options(("lr", "dtype", "loss_on"))
    def train(**kw): overrides = config_overrides(kw)

Key `grad_accum` becomes `--grad-accum`; a bool key `compile` becomes `--compile/--no-compile`; a key with
choices becomes a `click.Choice`; a numeric range becomes `click.IntRange` / `click.FloatRange`; a list key
(`report_to`) takes a comma-separated list. Every flag defaults to None (not given), so the config file and
the dataclass defaults keep their place below the flags.
"""

from __future__ import annotations

import click

from ..core.train_config import specs_by_name


def _type(spec: dict):
    kind, choices = spec["kind"], spec["choices"]
    if choices:
        return click.Choice([str(c) for c in choices])
    rng = dict(min=spec["min"], max=spec["max"], min_open=spec["min_open"], max_open=spec["max_open"])
    if kind == "int":
        return click.IntRange(**rng)
    if kind == "float":
        return click.FloatRange(**rng)
    return str


def _default(spec: dict) -> str:
    d = spec["default"]
    if isinstance(d, bool):
        return "on" if d else "off"
    if isinstance(d, (list, tuple)):
        return ",".join(map(str, d)) or "none"
    return "none" if d is None or d == "" else f"{d:g}" if isinstance(d, float) else str(d)


def _list_of(choices):
    """A click callback: "a,b" -> ["a", "b"], each one of `choices` (else a BadParameter naming them)."""
    def split(ctx, param, value):
        if value is None:
            return None
        items = [x.strip() for x in value.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise click.BadParameter(f"{', '.join(bad)}: choose from {', '.join(choices)} (comma-separated)")
        return items
    return split


def config_options(names):
    """A decorator adding one option per config key in `names`, in that order."""
    specs = specs_by_name()

    def deco(f):
        for name in reversed(tuple(names)):
            spec = specs[name]
            flag = "--" + name.replace("_", "-")
            help_ = f"{spec['help']}  [default: {_default(spec)}]"
            if spec["kind"] == "bool":
                f = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_)(f)
            elif spec["kind"] == "list":
                f = click.option(flag, name, default=None, metavar=",".join(map(str, spec["choices"])), help=help_,
                                 callback=_list_of(spec["choices"]))(f)
            else:
                f = click.option(flag, name, type=_type(spec), default=None, help=help_)(f)
        return f

    return deco


def config_overrides(values: dict) -> dict:
    """The flags' values as config keys (flags not given are left out; choices given as text become the
    key's type, e.g. `--quantize 4` -> 4)."""
    specs = specs_by_name()
    out = {}
    for name, v in values.items():
        if v is None or name not in specs:
            continue
        spec = specs[name]
        if spec["choices"] and spec["kind"] == "int":
            v = int(v)
        out[name] = v
    return out
