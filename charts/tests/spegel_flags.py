"""The command-line flags the `spegel` binary accepts, read from `spegel/src/config.rs`.

Parsing the clap derive source (rather than running `spegel --help`) works without a build.
`check_args` then validates a container's args the way clap would parse them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_RS = REPO_ROOT / "spegel" / "src" / "config.rs"

GO_DURATION = re.compile(r"^(?:0|(?:\d+(?:\.\d+)?(?:ns|us|µs|μs|ms|s|m|h))+)$")


@dataclass
class Flag:
    """One `--long` flag of a subcommand."""

    name: str
    rust_type: str
    multiple: bool = False
    boolean: bool = False
    required: bool = False
    duration: bool = False
    log_level: bool = False
    enum_values: list[str] = field(default_factory=list)


@dataclass
class Cli:
    """Flags per subcommand (global flags included in each)."""

    subcommands: dict[str, dict[str, Flag]]


def kebab(name: str) -> str:
    """`mirror_targets` -> `mirror-targets`, `CleanupWait` -> `cleanup-wait`."""
    name = re.sub(r"(?<=[a-z0-9])([A-Z])", r"-\1", name)
    return name.replace("_", "-").lower()


def _balanced(text: str, start: int) -> tuple[str, int]:
    """The text inside the bracket opening at `start`, and the index after its closing bracket."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = [pairs[text[start]]]
    i = start + 1
    in_str = False
    while i < len(text) and stack:
        ch = text[i]
        if in_str:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in pairs:
            stack.append(pairs[ch])
        elif ch == stack[-1]:
            stack.pop()
        i += 1
    if stack:
        raise ValueError(f"unbalanced bracket at offset {start}")
    return text[start + 1 : i - 1], i


def _block(source: str, header: str) -> str:
    """The body of the item (struct/enum) whose declaration matches regex `header`."""
    m = re.search(header + r"\s*\{", source)
    if not m:
        raise ValueError(f"{header!r} not found in config.rs")
    body, _ = _balanced(source, m.end() - 1)
    return body


def _fields(body: str) -> list[tuple[list[str], str, str]]:
    """(attribute bodies, field name, type) for each `pub field: Type` of a struct body."""
    out = []
    attrs: list[str] = []
    i = 0
    while i < len(body):
        if body.startswith("///", i) or body.startswith("//", i):
            i = body.find("\n", i)
            i = len(body) if i < 0 else i
            continue
        if body.startswith("#[", i):
            inner, i = _balanced(body, i + 1)
            attrs.append(inner)
            continue
        m = re.match(r"pub\s+(\w+)\s*:\s*", body[i:])
        if m:
            j = i + m.end()
            depth = 0
            k = j
            while k < len(body):
                if body[k] == "<":
                    depth += 1
                elif body[k] == ">":
                    depth -= 1
                elif body[k] == "," and depth == 0:
                    break
                k += 1
            out.append((attrs, m.group(1), body[j:k].strip()))
            attrs = []
            i = k + 1
            continue
        i += 1
    return out


def _arg_kv(attr: str) -> dict[str, str] | None:
    """Key/values of an `arg(...)` attribute; None for other attributes."""
    m = re.match(r"\s*arg\s*\(", attr)
    if not m:
        return None
    inner, _ = _balanced(attr, m.end() - 1)
    kv: dict[str, str] = {}
    parts, depth, cur, in_str = [], 0, "", False
    for ch in inner:
        if in_str:
            cur += ch
            if ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    for part in parts:
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            k, v = part.split("=", 1)
            kv[k.strip()] = v.strip()
        else:
            kv[part] = ""
    return kv


def _enum_variants(source: str, name: str) -> list[str]:
    try:
        body = _block(source, rf"pub\s+enum\s+{name}")
    except ValueError:
        # Enums re-exported by config.rs (`pub use crate::telemetry::EbpfMode`) live in their module.
        body = None
        for path in sorted((REPO_ROOT / "spegel" / "src").rglob("*.rs")):
            text = path.read_text(encoding="utf-8")
            if re.search(rf"pub\s+enum\s+{name}\s*\{{", text):
                body = _block(text, rf"pub\s+enum\s+{name}")
                break
        if body is None:
            raise
    body = re.sub(r"//.*", "", body)
    return [kebab(v) for v in re.findall(r"^\s*([A-Z]\w*)\s*[,(]?", body, re.M)]


def _flags_of_struct(source: str, struct: str, only_global: bool = False) -> dict[str, Flag]:
    flags: dict[str, Flag] = {}
    for attrs, fname, ftype in _fields(_block(source, rf"pub\s+struct\s+{struct}")):
        kvs = [kv for kv in (_arg_kv(a) for a in attrs) if kv is not None]
        if not kvs:
            continue
        kv: dict[str, str] = {}
        for d in kvs:
            kv.update(d)
        if "long" not in kv:
            continue
        if only_global and kv.get("global") != "true":
            continue
        name = kv["long"].strip('"') or kebab(fname)
        inner_type = re.sub(r"^Option<(.*)>$", r"\1", ftype)
        num_args = kv.get("num_args", "")
        flag = Flag(
            name=name,
            rust_type=ftype,
            multiple=ftype.startswith("Vec<") or ".." in num_args.replace("0..=1", ""),
            boolean=inner_type == "bool",
            required=kv.get("required") == "true",
            duration=kv.get("value_parser") == "parse_duration",
            log_level=kv.get("value_parser") == "parse_log_level",
        )
        if re.fullmatch(r"[A-Z]\w*", inner_type) and inner_type not in ("String", "Duration"):
            flag.enum_values = _enum_variants(source, inner_type)
        flags[name] = flag
    return flags


def parse_config_rs(path: Path = CONFIG_RS) -> Cli:
    """Reads every subcommand's flags from config.rs."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the chart tests read the binary's flags from it")
    source = path.read_text(encoding="utf-8")
    global_flags = _flags_of_struct(source, "Cli", only_global=True)
    command_body = re.sub(r"//.*", "", _block(source, r"pub\s+enum\s+Command"))
    subcommands: dict[str, dict[str, Flag]] = {}
    for variant, arg in re.findall(r"(\w+)\s*\(\s*(?:Box<)?\s*(\w+)\s*>?\s*\)", command_body):
        flags = dict(global_flags)
        flags.update(_flags_of_struct(source, arg))
        subcommands[kebab(variant)] = flags
    if not subcommands:
        raise ValueError("no subcommands found in config.rs")
    return Cli(subcommands)


def check_args(cli: Cli, args: list[str]) -> list[str]:
    """Problems clap would report for `spegel <args>`, or values of the wrong shape; [] if fine."""
    if not args:
        return ["no subcommand"]
    sub = args[0]
    if sub not in cli.subcommands:
        return [f"unknown subcommand {sub!r}"]
    flags = cli.subcommands[sub]
    errors: list[str] = []
    seen: set[str] = set()
    i = 1
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            errors.append(f"{sub}: unexpected value {arg!r} (not after a list flag)")
            continue
        name, eq, value = arg[2:].partition("=")
        flag = flags.get(name)
        if flag is None:
            errors.append(f"{sub}: unknown flag --{name}")
            continue
        if name in seen and not flag.multiple:
            errors.append(f"{sub}: --{name} given more than once")
        seen.add(name)
        values: list[str] = []
        if eq:
            values = [value]
        elif flag.boolean:
            errors.append(f"{sub}: boolean --{name} must be written --{name}=true|false")
        elif flag.multiple:
            while i < len(args) and not args[i].startswith("-"):
                values.append(args[i])
                i += 1
            if not values:
                errors.append(f"{sub}: list flag --{name} without values")
        else:
            if i >= len(args) or args[i].startswith("--"):
                errors.append(f"{sub}: --{name} needs a value")
            else:
                values = [args[i]]
                i += 1
        for v in values:
            errors.extend(_check_value(sub, flag, v))
    for flag in flags.values():
        if flag.required and flag.name not in seen:
            errors.append(f"{sub}: required flag --{flag.name} missing")
    return errors


def _check_value(sub: str, flag: Flag, value: str) -> list[str]:
    where = f"{sub}: --{flag.name}={value!r}"
    if flag.boolean and value not in ("true", "false"):
        return [f"{where} is not true or false"]
    if flag.duration and not GO_DURATION.match(value):
        return [f"{where} is not a Go duration"]
    if flag.log_level and value.upper() not in ("TRACE", "DEBUG", "INFO", "WARN", "WARNING", "ERROR"):
        return [f"{where} is not a log level"]
    if flag.enum_values and value not in flag.enum_values:
        return [f"{where} is not one of {flag.enum_values}"]
    if re.fullmatch(r"(Option<)?(u8|u16|u32|u64|usize|i32|i64)>?", flag.rust_type) and not value.isdigit():
        return [f"{where} is not an integer"]
    return []
