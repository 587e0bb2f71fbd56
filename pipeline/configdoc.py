"""The configuration reference (CONFIG.md), generated from the pydantic models of pipeline/config.py.

One table per section: key, type, default and the field's own description, so the reference cannot drift
from the code. `longcap config --reference` prints it; a test checks that CONFIG.md is current.
"""

from __future__ import annotations

import json
import re
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import Config

HEADER = """# Configuration reference

Generated from `pipeline/config.py` by `longcap config --reference > CONFIG.md` (a test fails when it is
stale). Every key is validated before any work starts; overrides use dotted keys
(`longcap run my.yaml download.timeout=5 captioners.0.name=alt`). Lists of sections (`captioners`) and maps of
sections (`prompts`) take the keys of the section named in their type.
"""


def _models(tp) -> list[type[BaseModel]]:
    """The pydantic models inside a type annotation (Optional[X], list[X], dict[str, X])."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for arg in typing.get_args(tp) for m in _models(arg)]


def _type_name(tp) -> str:
    text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    text = text or str(tp)
    text = re.sub(r"\b(typing|pipeline\.config|builtins)\.", "", text)
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    return text.replace("NoneType", "None")


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section defaults)"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return "(see README)"
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def _bounds(field) -> str:
    """The field's numeric bounds and pattern, e.g. '>= 1, <= 1024'."""
    out = []
    for m in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("pattern", "matches"),
                           ("min_length", "length >=")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sign} {v}")
    return ", ".join(out)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def section_tables(model: type[BaseModel], prefix: str, seen: set) -> list[str]:
    out = [f"## `{prefix}`" if prefix else "## top level", ""]
    if model.__doc__ and model.__doc__.strip() and model is not Config:
        out += [" ".join(model.__doc__.split()), ""]
    out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    nested = []
    for name, field in model.model_fields.items():
        bounds = _bounds(field)
        out.append(f"| `{name}` | `{_cell(_type_name(field.annotation))}`{' ' + _cell(bounds) if bounds else ''} | "
                   f"`{_cell(_default(field))}` | {_cell(field.description or '')} |")
        for sub in _models(field.annotation):
            key = (sub, f"{prefix}.{name}".lstrip("."))
            if key not in seen:
                seen.add(key)
                nested.append(key)
    out.append("")
    for sub, key in nested:
        out += section_tables(sub, key, seen)
    return out


def reference() -> str:
    return HEADER + "\n" + "\n".join(section_tables(Config, "", set())).rstrip() + "\n"
