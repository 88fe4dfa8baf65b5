"""`--domain-option NAME.KEY=VALUE`: set any option of any registered domain from the command line.

One generic mechanism instead of a hand-written flag per option, so plug-in domains get the
same access as the built-in ones. VALUE is read as JSON where it parses (`20`, `0.05`, `true`,
`null`, `"text"`), otherwise as a plain string (`crown.bounds=fast`). Every name is checked
against the registry and the domain's declared `options` before any work starts, and a value
whose type does not match the option's default is rejected (an int where a float is expected
is fine).
"""
from __future__ import annotations

import json
import math
from typing import Iterable

from verikit.errors import VerikitError

FLAG = "--domain-option"


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        low = text.strip().lower()
        if low in ("none", "null"):
            return None
        if low in ("true", "false"):
            return low == "true"
        return text


def _type_ok(default, value) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(default, str):
        return isinstance(value, (str, bool))  # string options also take e.g. input_split=true
    return True


def parse_domain_options(items: Iterable[str], chain: list) -> dict:
    """{domain: {option: value}} from `NAME.KEY=VALUE` strings; every domain must be in `chain`."""
    from verikit.domains import available_domains

    domains = available_domains()
    out: dict = {}
    for item in items:
        head, sep, raw = item.partition("=")
        name, dot, key = head.strip().partition(".")
        if not sep or not dot or not name or not key.strip():
            raise VerikitError(f"bad {FLAG} {item!r}: expected DOMAIN.OPTION=VALUE, e.g. crown.alpha_steps=20")
        key = key.strip()
        if name not in domains:
            raise VerikitError(f"{FLAG} {item!r}: unknown domain {name!r}; available: {', '.join(domains)}")
        if name not in chain:
            raise VerikitError(f"{FLAG} {item!r}: domain {name!r} is not in --domains ({','.join(chain)})")
        declared = domains[name].options
        if key not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise VerikitError(f"{FLAG} {item!r}: domain {name!r} has no option {key!r} (options: {known})")
        value = _parse_value(raw)
        if not _type_ok(declared[key], value):
            raise VerikitError(f"{FLAG} {item!r}: {name}.{key} takes a value like {declared[key]!r}, got {value!r}")
        out.setdefault(name, {})[key] = value
    return out


def merge_options(chain: list, shortcuts: dict, explicit: dict) -> dict:
    """Per domain: the shortcut flags (`--alpha-steps`, `--milp-solver`, ...) for every domain
    declaring that option, then the explicit `--domain-option` values, which win."""
    from verikit.domains import get_domain_class

    out = {}
    for name in chain:
        declared = get_domain_class(name).options
        opts = {k: v for k, v in shortcuts.items() if k in declared and v is not None}
        opts.update(explicit.get(name, {}))
        out[name] = opts
    return out
