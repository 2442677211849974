"""Every setting of every service, declared once: its variable, type, default, unit, doc and check.

A service's settings are a frozen dataclass whose fields are declared with `field(SETTING)`;
`load` fills one from command-line flags (derived from the variable's name: ADRENALINE_KV_CACHE_BYTES
is --kv-cache-bytes), then ADRENALINE_* environment variables, then the defaults, and refuses a
bad value with a message that names where it came from (`ADRENALINE_KV_CACHE_BYTES='1X': ...`)
instead of a traceback. `python -m common.settings` prints the reference table in
docs/settings.md, and a test keeps that file, compose.yaml and the Kubernetes manifests to the
names declared here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

PREFIX = "ADRENALINE_"


class SettingsError(ValueError):
    """A setting's value is unusable; the message names the variable or flag it came from."""


# ---- value parsers: text -> value, raising ValueError with a reason ------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def size(text: str) -> int:
    """Bytes: a plain count, or with a unit: KiB/MiB/GiB/TiB (and K/M/G/T, as Docker reads them)
    are powers of 1024, KB/MB/GB/TB powers of 1000."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError("expected a size such as 268435456, 256MiB or 1GiB")
    number, power, suffix = match.groups()
    base = 1000 if suffix.lower() == "b" and power else 1024
    value = float(number) * base ** _POWERS[power.lower()]
    if not value.is_integer():
        raise ValueError("a size must be a whole number of bytes")
    return int(value)


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def words(text: str) -> tuple[str, ...]:
    """A comma-separated list; blanks dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def integer(text: str) -> int:
    return int(text.strip())


# ---- checks: value -> the problem, or None ---------------------------------------------------------


def positive(value: float) -> str | None:
    return None if value > 0 else "must be positive"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be zero or more"


def port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number (0-65535)"


def subject_token(value: str) -> str | None:
    """Ids and prefixes become NATS subject tokens: no separators, no wildcards, no spaces."""
    if not value:
        return None
    bad = set(value) & set(".*> \t\r\n")
    return f"must not contain {sorted(bad)!r} (it is part of NATS subjects)" if bad else None


def prefix_check(value: str) -> str | None:
    if not value:
        return "must not be empty"
    return None if all(subject_token(part) is None and part for part in value.split(".")) else "is not a subject prefix"


def one_of(*choices: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


# ---- the declaration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    env: str  # the environment variable, ADRENALINE_*
    parse: Callable[[str], Any]  # text -> value; raises ValueError saying what it expected
    default: Any  # dataclasses.MISSING: required
    doc: str
    unit: str = ""
    check: Callable[[Any], str | None] | None = None
    secret: bool = False  # never printed: the docs table shows no default, errors show no value

    @property
    def flag(self) -> str:
        return "--" + self.env.removeprefix(PREFIX).lower().replace("_", "-")

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def value(self, text: str, source: str) -> Any:
        """The value of `text`, from `source` (a variable or flag name), checked."""
        shown = "(hidden)" if self.secret else repr(text)
        try:
            value = self.parse(text)
        except ValueError as exc:
            raise SettingsError(f"{source}={shown}: {exc}") from None
        self.verify(value, source)
        return value

    def verify(self, value: Any, source: str) -> None:
        problem = self.check(value) if self.check else None
        if problem:
            shown = "(hidden)" if self.secret else repr(value)
            raise SettingsError(f"{source}={shown}: {problem}")


def field(setting: Setting, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field for `setting` (its own default unless this service needs another)."""
    chosen = setting.default if default is dataclasses.MISSING else default
    meta = {"setting": setting}
    if isinstance(chosen, (list, dict, set)):
        raise TypeError("settings defaults must be immutable")
    shown = not setting.secret  # a secret is never in a repr, so never in a log line
    if chosen is dataclasses.MISSING:
        return dataclasses.field(metadata=meta, repr=shown)
    return dataclasses.field(default=chosen, metadata=meta, repr=shown)


def settings_of(cls: type) -> list[tuple[dataclasses.Field[Any], Setting]]:
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(cls) if "setting" in f.metadata]


def verify(instance: Any) -> None:
    """Check every field of a settings dataclass (call from its `__post_init__`), so that settings
    built in code (tests, `adrenaline up`) are held to the same rules as those read from outside."""
    for f, setting in settings_of(type(instance)):
        setting.verify(getattr(instance, f.name), setting.env)


def load(cls: type[Any], argv: list[str] | None, prog: str, environ: Mapping[str, str] | None = None) -> Any:
    """A `cls` from flags, then the environment, then defaults. Raises SettingsError naming the source."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    for f, setting in settings_of(cls):
        default = "required" if f.default is dataclasses.MISSING else ("(secret)" if setting.secret else f.default)
        parser.add_argument(
            setting.flag,
            dest=f.name,
            default=None,
            metavar=setting.unit.upper() or "VALUE",
            help=f"{setting.doc} [{setting.env}; default: {default}]",
        )
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    missing = []
    for f, setting in settings_of(cls):
        if args[f.name] is not None:
            values[f.name] = setting.value(args[f.name], setting.flag)
        elif setting.env in environ:
            values[f.name] = setting.value(environ[setting.env], setting.env)
        elif setting.secret and f"{setting.env}_FILE" in environ:  # a mounted secret (compose, Kubernetes)
            values[f.name] = setting.value(_read_secret(environ[f"{setting.env}_FILE"], setting.env), setting.env)
        elif f.default is dataclasses.MISSING:
            missing.append(f"{setting.flag} or {setting.env}")
    if missing:
        raise SettingsError(f"required: {'; '.join(missing)}")
    try:
        return cls(**values)
    except SettingsError:
        raise
    except ValueError as exc:  # a rule across settings (`__post_init__`)
        raise SettingsError(str(exc)) from None


def _read_secret(path: str, env: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise SettingsError(f"{env}_FILE={path!r}: {exc.strerror}") from None


def load_or_exit(cls: type[Any], argv: list[str] | None, prog: str) -> Any:
    """`load` for a service's `main`: a bad setting ends the process with its message and status 2,
    as argparse does for a bad flag, never with a traceback."""
    try:
        return load(cls, argv, prog)
    except SettingsError as exc:
        _exit(prog, str(exc))


def _exit(prog: str, message: str) -> NoReturn:
    print(f"{prog}: bad setting: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---- the reference table ----------------------------------------------------------------------------


def _services() -> list[tuple[str, type]]:
    """Every service's settings class (imported here, not at module load: they import torch)."""
    from services.gateway.settings import GatewaySettings
    from services.runtime import InstanceSettings
    from services.scheduler.service import SchedulerSettings

    return [
        ("gateway", GatewaySettings),
        ("scheduler", SchedulerSettings),
        ("prefill, decode, attention_executor", InstanceSettings),
    ]


def declared(services: Iterable[tuple[str, type]] | None = None) -> dict[str, tuple[Setting, list[str], Any]]:
    """Each variable -> (its setting, the services that read it, the default each uses)."""
    table: dict[str, tuple[Setting, list[str], Any]] = {}
    for service, cls in services if services is not None else _services():
        for f, setting in settings_of(cls):
            known = table.get(setting.env)
            if known is not None and known[0] is not setting:
                raise TypeError(f"{setting.env} is declared twice")
            default = f.default
            table.setdefault(setting.env, (setting, [], default))[1].append(service)
    return dict(sorted(table.items()))


def markdown() -> str:
    """docs/settings.md: generated, so that the reference cannot drift from the code."""
    lines = [
        "# Settings",
        "",
        "<!-- Generated by `python -m common.settings > docs/settings.md`; a test checks it is current. -->",
        "",
        "Every service reads its settings from command-line flags, else from these environment",
        "variables, else the default. The flag is the variable's name without `ADRENALINE_`, in",
        "lower case with dashes: `ADRENALINE_KV_CACHE_BYTES` is `--kv-cache-bytes`. A bad value",
        "stops the service at start with a message naming the variable. Sizes take units:",
        "`256MiB`, `1GiB` (K/M/G/T are powers of 1024, KB/MB/GB/TB powers of 1000). A secret can",
        "also come from a file: `ADRENALINE_NATS_PASSWORD_FILE=/run/secrets/nats-decode`.",
        "",
        "| Variable | Services | Default | Unit | Meaning |",
        "|---|---|---|---|---|",
    ]
    for env, (setting, services, default) in declared().items():
        if setting.secret:
            shown = "(secret)"
        elif default is dataclasses.MISSING:
            shown = "required"
        elif default == "" or default == ():
            shown = "(none)"
        else:
            shown = f"`{','.join(default) if isinstance(default, tuple) else default}`"
        lines.append(f"| `{env}` | {', '.join(services)} | {shown} | {setting.unit} | {setting.doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
