"""JSON Schema (the subset the admin API uses) as plain dicts, and one validator for it.

The admin API declares every request body, query parameter and answer with these schemas; the
same dicts go verbatim into the OpenAPI 3.1 document (JSON Schema 2020-12), so what the document
says is what the server checks. No I/O, no Trio.

The subset: `type` (one name, or `[name, "null"]`), `properties`, `required`,
`additionalProperties: false`, `minLength`/`maxLength`/`pattern`/`enum` for strings,
`minimum`/`maximum` for integers, `items`/`maxItems` for arrays. `validate` raises `invalid`
naming the first field at fault, or returns the value with integral floats made ints (JSON
Schema counts 1.0 as an integer); it never changes its input. Strings count characters (code
points) and `$` ends the input, as JSON Schema (ECMA-262 patterns) does.
`tests/test_openapi.py` checks `validate` against a JSON Schema implementation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from node.errors import invalid

Schema = dict[str, Any]

# Ids are what node.ids.new_id makes (`prefix_` + base32); a path or query id outside this
# shape can name nothing, so it is refused before any lookup.
ID_PATTERN = r"^[a-z]{2,8}_[a-z0-9]{1,64}$"
NAME_CHARS = 200


def string(
    min_len: int = 1,
    max_len: int = NAME_CHARS,
    *,
    enum: Sequence[str] | None = None,
    pattern: str | None = None,
    fmt: str | None = None,
    nullable: bool = False,
    description: str | None = None,
) -> Schema:
    s: Schema = {"type": ["string", "null"] if nullable else "string"}
    if enum is not None:
        s["enum"] = [*enum, None] if nullable else list(enum)
    else:
        s["minLength"] = min_len
        s["maxLength"] = max_len
    if pattern is not None:
        s["pattern"] = pattern
    if fmt is not None:
        s["format"] = fmt
    if description is not None:
        s["description"] = description
    return s


def id_string(*, nullable: bool = False, description: str | None = None) -> Schema:
    return string(3, 80, pattern=ID_PATTERN, nullable=nullable, description=description)


def timestamp(*, nullable: bool = False) -> Schema:
    return string(1, 40, fmt="date-time", nullable=nullable)


def integer(
    minimum: int | None = None, maximum: int | None = None, *, nullable: bool = False
) -> Schema:
    s: Schema = {"type": ["integer", "null"] if nullable else "integer"}
    if minimum is not None:
        s["minimum"] = minimum
    if maximum is not None:
        s["maximum"] = maximum
    return s


def boolean() -> Schema:
    return {"type": "boolean"}


def array(items: Schema, max_items: int | None = None) -> Schema:
    s: Schema = {"type": "array", "items": items}
    if max_items is not None:
        s["maxItems"] = max_items
    return s


def obj(
    properties: Mapping[str, Schema],
    required: Sequence[str] = (),
    *,
    additional: bool | Schema = False,
) -> Schema:
    s: Schema = {"type": "object", "properties": dict(properties)}
    if required:
        s["required"] = list(required)
    s["additionalProperties"] = additional
    return s


def any_object() -> Schema:
    return {"type": "object"}


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
    "number": (int, float),
}


def _is(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()  # JSON Schema: 1.0 is an integer (`validate` makes it 1)
    return isinstance(value, _TYPES[name])


@cache
def _regex(pattern: str) -> re.Pattern[str]:
    # JSON Schema patterns are ECMA-262: `$` ends the input. Python's `$` also matches before
    # a final newline, which would let "id\n" through.
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def validate(schema: Schema, value: Any, where: str = "body") -> Any:
    """`value` if it fits `schema` (integral floats where integers are expected made ints; the
    input itself is never changed), else `invalid` naming `where` and the field path."""
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_is(value, n) for n in names):
            raise invalid(f"{where} must be {' or '.join(_article(n) for n in names)}")
        if isinstance(value, float) and "integer" in names:
            value = int(value)
    if value is None:
        return value
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(str(c) for c in schema["enum"] if c is not None)
        raise invalid(f"{where} must be one of {choices}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1 << 30):
            lo, hi = schema.get("minLength", 0), schema.get("maxLength", "any number of")
            raise invalid(f"{where} must have {lo} to {hi} characters")
        pattern = schema.get("pattern")
        if pattern is not None and _regex(pattern).search(value) is None:
            raise invalid(f"{where} is not well-formed (expected {pattern})")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise invalid(f"{where} must be between {lo} and {hi}")
    elif isinstance(value, list):
        if len(value) > schema.get("maxItems", 1 << 30):
            raise invalid(f"{where} has more than {schema['maxItems']} items")
        items = schema.get("items")
        if items is not None:
            value = [validate(items, item, f"{where}[{i}]") for i, item in enumerate(value)]
    elif isinstance(value, dict):
        value = _validate_object(schema, value, where)
    return value


def _validate_object(schema: Schema, value: dict[str, Any], where: str) -> dict[str, Any]:
    props: dict[str, Schema] = schema.get("properties", {})
    for key in schema.get("required", ()):
        if key not in value:
            raise invalid(f"{_field(where, key)} is required")
    extra = schema.get("additionalProperties", True)
    out: dict[str, Any] = {}
    for key, item in value.items():
        sub = props.get(key)
        if sub is not None:
            out[key] = validate(sub, item, _field(where, key))
        elif extra is False:
            allowed = ", ".join(props) or "none"
            raise invalid(f"{_field(where, key)} is not allowed (fields: {allowed})")
        elif isinstance(extra, dict):
            out[key] = validate(extra, item, _field(where, key))
        else:
            out[key] = item
    return out


def _field(where: str, key: str) -> str:
    return f"field '{key}'" if where == "body" else f"{where}.{key}"


def _article(name: str) -> str:
    return {"integer": "an integer", "object": "an object", "array": "an array"}.get(
        name, "null" if name == "null" else f"a {name}"
    )
