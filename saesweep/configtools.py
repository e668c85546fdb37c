"""The one config and command-line mechanism of every entry point: files and flags to
frozen dataclasses.

collect.py (a TOML file) and train.py (a sweep file) build their configs the same way: the
file's dicts and the command line's `--a.b-c VALUE` flags are deep-merged (flags > file >
defaults) and applied to the dataclass defaults, with closest-key errors for unknown keys;
range checks live beside their fields (`field(metadata=at_least(1))`), and --help is tyro's
rendering of the field docstrings.

A nested config marked `short=True` (the Slurm settings) may also be written without its
section: `--slurm-acct A` or `--n-hours 24` name `slurm.acct` and `slurm.n_hours`. A field of
a nested config may name other spellings of itself in its parent (`field(metadata=alias(...))`):
`sae.n_experts` names `sae.switch.n_experts`, the field whose aliases hold "n_experts".

Every entry point parses its command line here: collect.py and train.py a command plus a config
(parse_command_line), the collection shell, the feature pages and the report a command alone
(parse_command), whose fields typed `positional(...)` are its positional arguments. A list
flag takes comma-separated values, or several values after it (`--latents 0 5 17`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from saesweep.errors import UserError

T = TypeVar("T")


def closest(name: str, options: Iterable[str]) -> str:
    """' (did you mean X?)' for the nearest option, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def section(factory: Callable[[], Any], short: bool = False) -> Any:
    """A nested config field; `short` lets its fields be named without the section prefix."""
    return dataclasses.field(default_factory=factory, metadata={"short": short})


def alias(*names: str) -> dict:
    """Field metadata of a nested config's field: `names` are its other spellings in the
    parent config (keys beside the section's own name), e.g. alias("n_experts") on
    SwitchConfig.n_experts makes `sae.n_experts` mean `sae.switch.n_experts`."""
    return {"aliases": names}


def resolve_key(cls: type, key: str) -> list[str]:
    """The field path `key` names in `cls`: the field itself, a section's field that has `key`
    among its aliases, or a field of a short section spelled `<section>_<field>` or `<field>`;
    [] when it names nothing."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key in fields:
        return [key]
    hints = typing.get_type_hints(cls)
    sections = [(name, f) for name, f in fields.items() if dataclasses.is_dataclass(hints[name])]
    for name, _ in sections:
        for g in dataclasses.fields(hints[name]):
            if key in g.metadata.get("aliases", ()):
                return [name, g.name]
    for name, f in sections:
        if f.metadata.get("short"):
            inner = {g.name for g in dataclasses.fields(hints[name])}
            for candidate in (key.removeprefix(f"{name}_"), key):
                if candidate in inner:
                    return [name, candidate]
    return []


def spelled_out(cls: type, values: dict) -> dict:
    """`values`, a dict of `cls`'s fields as a file wrote it (a sweep.json, a cfg.json of an
    older version), with every alias and short key nested at its field path; keys `cls` does
    not know are kept as they are."""
    out: dict = {}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        path = resolve_key(cls, key) or [key]
        inner = hints.get(path[0])
        if len(path) == 1 and isinstance(value, dict) and dataclasses.is_dataclass(inner):
            value = spelled_out(inner, value)
        out = deep_merge(out, {path[0]: value if len(path) == 1 else {path[1]: value}})
    return out


def _options(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def replace_from_dict(base: T, values: dict[str, Any], where: str) -> T:
    """`base` with the fields in `values` replaced, nested dicts merged into nested configs.

    Unknown keys and values of the wrong type raise UserError naming `where` and the key.
    """
    values = _nest(type(base), values, where)
    hints = typing.get_type_hints(type(base))
    changes = {}
    for name, value in values.items():
        current = getattr(base, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[name] = replace_from_dict(current, value, f"{where}.{name}")
        else:
            changes[name] = coerce(value, hints[name], f"{where}: key {name!r}")
    return dataclasses.replace(base, **changes)


def _nest(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` with each key resolved to its field (short section keys nested)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise UserError(f"{where}: key {key!r} is not a string; config keys are field names")
        path = resolve_key(cls, key.replace("-", "_"))
        if not path:
            raise UserError(f"{where}: unknown key {key!r}{closest(key, _options(cls))}")
        nested = value if len(path) == 1 else {path[1]: value}
        out = deep_merge(out, {path[0]: nested})
    return out


def deep_merge(base: dict, override: dict) -> dict:
    """`base` with `override` applied; nested dicts merge key by key. The keys `override`
    sets come after the others: where one field is spelled two ways (an alias in one dict,
    its section in the other), replace_from_dict, which applies keys in order, takes the
    override's value."""
    out = {key: value for key, value in base.items() if key not in override}
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = deep_merge(base[key], value)
        else:
            out[key] = value
    return out


def parse_command_line(
    args: list[str], command: type[T], config: type, program: str, usage: str
) -> tuple[T, dict]:
    """The command's own flags (fields of the `command` dataclass) as a checked instance, and
    the config flags as a nested dict of the explicitly given fields of `config`; -h or
    --help prints `usage` and the config's fields, and exits."""
    if "-h" in args or "--help" in args:
        print_help(config, program, usage)
        raise SystemExit(0)
    own, overrides = parse_flags(args, (command, config), program)
    return _checked(command, own, program), overrides


def parse_command(argv: list[str] | None, command: type[T], program: str, usage: str) -> T:
    """A command line (`argv`, default sys.argv[1:]) that sets only the fields of `command`
    (positional arguments among them) as a checked instance; -h or --help prints the help
    and exits."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print_help(command, program, usage)
        raise SystemExit(0)
    (own,) = parse_flags(args, (command,), program)
    return _checked(command, own, program)


def _checked(command: type[T], given: dict[str, Any], program: str) -> T:
    """`command` built from the given fields, each required one present and every range
    check beside a field met."""
    for f in dataclasses.fields(command):
        required = f.default is f.default_factory is dataclasses.MISSING
        if required and f.name not in given:
            raise UserError(f"{program} needs {_spelling(command, f.name)}; see {program} --help")
    options = command(**given)
    for name, value, want in violations(options):
        raise UserError(f"--{name.replace('_', '-')} {value!r} must be {want}")
    return options


def _spelling(command: type, name: str) -> str:
    """How the command line writes the field `name`: its METAVAR or its --flag."""
    return _positionals(command).get(name, "--" + name.replace("_", "-"))


POSITIONAL = object()
"""Annotated metadata marking a positional argument (see `positional`)."""
REST = object()
"""Annotated metadata marking the positional argument that takes the rest of the line."""


def positional(hint: Any, metavar: str, rest: bool = False) -> Any:
    """The type of a command's positional argument, shown as `metavar` in --help
    (`uri: positional(str, "URI")`). A tuple-typed one, the last, takes every positional
    argument; with `rest`, every argument from its first one on, flags included."""
    import tyro

    marks = (POSITIONAL, REST) if rest else (POSITIONAL,)
    return Annotated[tyro.conf.Positional[hint], tyro.conf.arg(metavar=metavar), *marks]


def _positionals(cls: type) -> dict[str, str]:
    """The positional fields of `cls` in order, with their metavars."""
    hints = typing.get_type_hints(cls, include_extras=True)
    found = {}
    for f in dataclasses.fields(cls):
        extras = getattr(hints[f.name], "__metadata__", ())
        if any(extra is POSITIONAL for extra in extras):
            found[f.name] = next(e.metavar for e in extras if hasattr(e, "metavar"))
    return found


def parse_flags(args: list[str], classes: tuple[type, ...], program: str) -> list[dict]:
    """`--a.b-c VALUE` flags (`--flag` alone for true, `--no-flag` for false on booleans; a
    list flag: comma-separated, or every value up to the next flag) to one nested dict per
    class of the explicitly given fields; a flag goes to the first class that has its field.
    The other arguments are the first class's positional fields (after `--`: all of them)."""
    found: list[dict] = [{} for _ in classes]
    words: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--":
            words += args[i + 1 :]
            break
        if args[i].startswith("--"):
            i = _take_flag(args, i, classes, found, program)
            continue
        words.append(args[i])
        i += 1
        if _rest_reached(classes[0], words):
            words += args[i:]
            break
    found[0].update(_positional_values(classes[0], words, program))
    return found


def _rest_reached(cls: type, words: list[str]) -> bool:
    """Whether the last of `words` is the first of a `rest` positional, which takes every
    argument after it."""
    names = list(_positionals(cls))
    if not names or len(words) != len(names):
        return False
    extras = getattr(typing.get_type_hints(cls, include_extras=True)[names[-1]], "__metadata__", ())
    return any(extra is REST for extra in extras)


def _positional_values(cls: type, words: list[str], program: str) -> dict[str, Any]:
    """The positional fields' values from the positional arguments."""
    names = _positionals(cls)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, metavar in names.items():
        if not words:
            break
        if _is_tuple(cls, name):
            values[name] = tuple(parse_value(w, get_args(hints[name])[0], metavar) for w in words)
            words = []
        else:
            values[name], words = parse_value(words[0], hints[name], metavar), words[1:]
    if words:
        hint = "config flags look like --lr 1e-3" if not names else f"see {program} --help"
        raise UserError(f"unexpected argument {words[0]!r}; {hint}")
    return values


def _is_tuple(cls: type, name: str) -> bool:
    return get_origin(typing.get_type_hints(cls)[name]) is tuple


def _take_flag(args: list[str], i: int, classes, found: list[dict], program: str) -> int:
    """Set the flag at args[i] (and its values) in `found`; the index after them."""
    flag = args[i]
    name, _, inline = flag[2:].partition("=")
    negated = name.startswith("no-") and _is_bool(classes, name[3:])
    which, path, hint = _field_path(classes, (name[3:] if negated else name), flag, program)
    if hint is bool and not inline:
        value: Any = not negated
        i += 1
    elif inline:
        value = parse_value(inline, hint, flag)
        i += 1
    else:
        values = _values_after(args, i, _list_type(hint) is not None)
        if not values:
            raise UserError(f"flag {flag} needs a value")
        value = parse_value(",".join(values) if len(values) > 1 else values[0], hint, flag)
        i += 1 + len(values)
    node = found[which]
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return i


def _values_after(args: list[str], i: int, several: bool) -> list[str]:
    """The value(s) of the flag at args[i]: the next argument, or for a list every one up to
    the next flag."""
    following = args[i + 1 :]
    if not several:
        return following[:1]
    end = next((j for j, a in enumerate(following) if a.startswith("--")), len(following))
    return following[:end]


def _list_type(hint: Any) -> Any:
    """The tuple type within `hint` (a tuple, or an optional tuple), or None."""
    for arg in (hint, *get_args(hint)):
        if get_origin(arg) is tuple:
            return arg
    return None


def _is_bool(classes: tuple[type, ...], name: str) -> bool:
    try:
        return _field_path(classes, name, name, "")[2] is bool
    except UserError:
        return False


def _field_path(
    classes: tuple[type, ...], name: str, flag: str, program: str
) -> tuple[int, list[str], Any]:
    """Which class a dotted kebab-case flag belongs to, its field path and the field's type;
    an unknown flag names the closest field of the last class."""
    parts = name.replace("-", "_").split(".")
    for which, cls in enumerate(classes):
        path, hint, complete = _walk(cls, parts)
        if complete and dataclasses.is_dataclass(hint):
            raise UserError(
                f"flag {flag} names a group of settings; give one field, e.g. {flag}.FIELD"
            )
        if complete:
            return which, path, hint
    path, cls, _ = _walk(classes[-1], parts)
    prefix = ".".join(path)
    fields = _options(cls) if dataclasses.is_dataclass(cls) else []
    options = [f"{prefix}.{k}" if prefix else k for k in fields]
    match = difflib.get_close_matches(".".join(parts), options, n=1, cutoff=0.5)
    hint = f" (did you mean --{match[0].replace('_', '-')}?)" if match else ""
    raise UserError(f"unknown flag {flag}{hint}; see {program} --help")


def _walk(cls: type, parts: list[str]) -> tuple[list[str], Any, bool]:
    """The field path `parts` name in `cls` as far as they resolve, the type reached there,
    and whether all of them resolved."""
    path: list[str] = []
    for part in parts:
        found = resolve_key(cls, part) if dataclasses.is_dataclass(cls) else []
        if not found:
            return path, cls, False
        for key in found:
            cls = typing.get_type_hints(cls)[key]
        path += found
    return path, cls, True


def parse_value(raw: str, hint: Any, flag: str) -> Any:
    """A command-line string as a value of type `hint` (a list: comma-separated)."""
    listed = _list_type(hint)
    if listed is hint or (listed is not None and raw.lower() not in ("none", "null")):
        items = [item.strip() for item in raw.split(",") if item.strip()]
        return tuple(parse_value(item, get_args(listed)[0], flag) for item in items)
    candidates: list[Any] = [raw]
    if raw.lower() in ("none", "null"):
        candidates.insert(0, None)
    if raw.lower() in ("true", "false"):
        candidates.insert(0, raw.lower() == "true")
    for convert in (int, float):
        with contextlib.suppress(ValueError):
            candidates.insert(0, convert(raw))
    for value in candidates:
        with contextlib.suppress(UserError):
            return coerce(value, hint, f"flag {flag}")
    choices = [
        c for arg in (*get_args(hint), hint) if get_origin(arg) is Literal for c in get_args(arg)
    ]
    if choices:
        raise UserError(f"{flag} {raw!r} is not one of {', '.join(map(str, choices))}")
    return coerce(raw, hint, f"flag {flag}")


def parse_slice(spec: str) -> slice:
    """A Python slice written as text: ':-1', '-1:', '2:5', or one index '3'."""
    try:
        parts = [int(p) if p.strip() else None for p in spec.split(":")]
        return slice(*parts) if len(parts) > 1 else slice(parts[0], parts[0] + 1 or None)
    except (ValueError, TypeError):
        raise UserError(f"shards={spec!r} is not a Python slice such as ':-1' or '-1:'") from None


def coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against the type `hint` (ints widen to floats, lists become tuples)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            with contextlib.suppress(UserError):
                return coerce(value, arg, where)
        raise UserError(f"{where} has value {value!r}, expected {_describe(hint)}")
    if origin is Literal:
        if value in args:
            return value
        raise UserError(
            f"{where} has value {value!r}, expected one of {', '.join(map(repr, args))}"
        )
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise UserError(f"{where} has value {value!r}, expected a list")
        item = args[0] if args else Any
        return tuple(coerce(v, item, where) for v in value)
    if hint is Any:
        return value
    if hint is type(None) and value is None:
        return None
    if isinstance(value, bool) and hint is not bool:
        raise UserError(f"{where} has value {value!r}, expected {_describe(hint)}")
    if hint is float and isinstance(value, int | float):
        return float(value)
    if isinstance(hint, type) and hint is not type(None) and isinstance(value, hint):
        return value
    raise UserError(f"{where} has value {value!r}, expected {_describe(hint)}")


def _describe(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _rule(test: Callable[[Any], bool], want: str, optional: bool) -> dict:
    def check(value: Any) -> bool:
        if value is None:
            return optional
        return math.isfinite(value) and test(value)

    return {"check": (check, want + (" or unset" if optional else ""))}


def above(low: float, optional: bool = False) -> dict:
    """Field metadata: the value must be greater than `low`."""
    return _rule(lambda v: v > low, f"greater than {low}", optional)


def at_least(low: float, optional: bool = False) -> dict:
    """Field metadata: the value must be at least `low`."""
    return _rule(lambda v: v >= low, f"at least {low}", optional)


def fraction(open_top: bool = False) -> dict:
    """Field metadata: the value must lie in [0, 1] (or [0, 1))."""
    if open_top:
        return _rule(lambda v: 0 <= v < 1, "in [0, 1)", False)
    return _rule(lambda v: 0 <= v <= 1, "in [0, 1]", False)


def one_of(options: Callable[[], Collection[str]]) -> dict:
    """Field metadata: the value must be one of options(), read when the value is checked (a
    registry that grows as modules register in it)."""

    def want(value: Any) -> str:
        return f"one of {', '.join(options())}{closest(str(value), options())}"

    return {"check": (lambda v: v in options(), want)}


def violations(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted field name, value, what it must be) for each field breaking the check beside it."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from violations(value, f"{name}.")
        elif "check" in f.metadata and not f.metadata["check"][0](value):
            want = f.metadata["check"][1]
            yield name, value, want(value) if callable(want) else want


PLAIN_NAME = {
    "check": (
        lambda v: v == "" or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", v) is not None,
        "empty or a plain name of letters, digits and . _ + = - (no '/', no leading '.')",
    )
}
"""Field metadata: the value becomes part of a path, so it must be a plain name."""


def check_values(cfg: Any, where: str, source: str = "the file") -> None:
    """Raise UserError naming the first field whose value breaks the check beside it."""
    for name, value, want in violations(cfg):
        flag = "--" + name.replace("_", "-")
        raise UserError(
            f"{where}: {name}={value!r}, but it must be {want}; set it in {source} or with {flag}"
        )


def print_help(cls: type, prog: str, usage: str) -> None:
    """`usage`, then every field of `cls` with its docstring (tyro's rendering)."""
    import tyro

    rendered = io.StringIO()
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(rendered):
        tyro.cli(cls, args=["--help"], prog=prog)
    text = rendered.getvalue()
    if text.startswith("usage:"):  # tyro's own usage line: ours replaces it
        text = text.partition("\n\n")[2]
    print(usage)
    print(text, end="")
    spellings = dict(_alias_flags(cls))
    if spellings:
        print("\nother spellings:")
        for other, flag in spellings.items():
            print(f"  {other:<36} {flag}")


def _alias_flags(cls: type, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(alias flag, field flag) for every aliased field of `cls`'s sections, at any depth."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner = hints[f.name]
        if not dataclasses.is_dataclass(inner):
            continue
        path = f"{prefix}{f.name}."
        for g in dataclasses.fields(inner):
            for name in g.metadata.get("aliases", ()):
                yield _flag(prefix + name), _flag(path + g.name)
        yield from _alias_flags(inner, path)


def _flag(path: str) -> str:
    return "--" + path.replace("_", "-")
