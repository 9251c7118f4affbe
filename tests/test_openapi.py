"""schemathesis against a live node's /openapi.json: no 5xx, and every answer conforms to the
document (status codes, content types, schemas); bad input is refused (4xx).

It runs the `st` command (schemathesis, pinned in pyproject.toml) as a subprocess with the
operator's token and bounded examples. Path parameters are pinned to a real org, instance and
user made first, so the generated calls reach the handlers, not only the 404 of an unknown id.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import GB6Error
from origin.admin_schema import validate
from tests.conftest import Node, module_node

node = module_node("openapi")
ST = Path(sys.executable).parent / "st"
CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "ignored_auth",  # a call without (or with a bad) credential must be refused
        "unsupported_method",  # 405 with `Allow` for a method the path does not have
    )
)
MAX_EXAMPLES = 5  # per operation and phase: the run stays well under two minutes


def test_schemathesis_finds_nothing(node: Node, tmp_path: Path) -> None:
    tenant = node.create_tenant()
    user = tenant.user("fuzzed")
    member = node.admin("POST", f"/v1/orgs/{tenant.org}/members", {"name": "m", "role": "admin"})
    key = node.admin(
        "POST", f"/v1/orgs/{tenant.org}/api_keys", {"name": "k", "permissions": ["org.read"]}
    )
    assert member.status_code == 201 and key.status_code == 201, (member.text, key.text)
    # A config file pins each path parameter (by name) to something that exists.
    pinned = {
        "org": tenant.org,
        "inst": tenant.instance,
        "user": user.id,
        "member": member.json()["id"],
        "key": key.json()["id"],
        "plan": "free",
        "resource": "rooms",
        "period": "2020-01",
    }
    _schemathesis(node, tmp_path, node.admin_token, pinned, "examples,coverage,fuzzing,stateful")
    # The node is still serving after all of it (the stateful phase may have deleted what the
    # test made, legitimately: a new organization is the proof).
    assert node.admin("POST", "/v1/orgs", {"name": "after"}).status_code == 201


def test_schemathesis_as_an_instance_scoped_api_key(node: Node, tmp_path: Path) -> None:
    """The same checks with a credential that reaches one instance and holds some of the
    permissions there: its refusals (403 inside its reach, 404 outside: another instance, every
    org) must be documented answers too, never a 5xx."""
    tenant = node.create_tenant()
    other = node.create_tenant()
    user = tenant.user("fuzzed")
    perms = ["instance.read", "user.read", "user.write", "quota.read", "usage.read"]
    key = node.admin(
        "POST",
        f"/v1/orgs/{tenant.org}/api_keys",
        {"name": "scoped", "permissions": perms, "instance": tenant.instance},
    )
    assert key.status_code == 201, key.text
    pinned = {
        "org": tenant.org,
        "inst": tenant.instance,
        "user": user.id,
        "member": "mem_nope",
        "key": key.json()["id"],
        "plan": "free",
        "resource": "rooms",
        "period": "2020-01",
    }
    _schemathesis(node, tmp_path, key.json()["secret"], pinned, "examples,coverage", 3)
    # Nothing outside its reach changed; the key still works where it may.
    assert node.admin("GET", f"/v1/instances/{other.instance}").json()["status"] == "active"
    r = node.admin("GET", f"/v1/instances/{tenant.instance}", token=key.json()["secret"])
    assert r.status_code == 200, r.text


def _schemathesis(
    node: Node,
    tmp_path: Path,
    token: str,
    pinned: dict[str, str],
    phases: str,
    max_examples: int = MAX_EXAMPLES,
) -> None:
    """`st run` against the node's document with `token`, path parameters `pinned`."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[parameters]\n" + "".join(f'"path.{k}" = "{v}"\n' for k, v in pinned.items())
    )
    cmd = [
        str(ST),
        "--config-file",
        str(config),
        "run",
        f"{node.http_url}/openapi.json",
        "-H",
        f"Authorization: Bearer {token}",
        "--checks",
        CHECKS,
        "--max-examples",
        str(max_examples),
        "--phases",
        phases,
        "--seed",
        "6",
        "--generation-deterministic",
        # One worker: with threads, hypothesis's lambda descriptions hit a CPython 3.11
        # ast.parse race ("AST constructor recursion depth mismatch").
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--no-color",
        "--warnings",
        "off",
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=170, check=False
    )
    report = proc.stdout[-12000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert "passed" in proc.stdout, report


def _near(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values around `schema`: mostly shaped like it (known fields, bounds, patterns), often
    not (wrong types, extra fields, one character too many)."""
    json_leaf = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 2**31),
        st.sampled_from([0.0, 1.0, 2.5, -1.0, 1e30]),
        st.text(max_size=5),
    )
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    options: list[st.SearchStrategy[Any]] = [json_leaf]
    if "enum" in schema:
        options.append(st.sampled_from(schema["enum"]))
    if "string" in kinds:
        lo, hi = schema.get("minLength", 0), schema.get("maxLength", 10)
        options.append(st.text(min_size=max(0, lo - 1), max_size=min(hi + 1, 300)))
        if "pattern" in schema:
            pat = schema["pattern"].removesuffix("$")
            options.append(st.from_regex(pat, fullmatch=True))
            options.append(st.from_regex(pat, fullmatch=True).map(lambda v: v + "\n"))
    if "integer" in kinds:
        lo, hi = schema.get("minimum", -10), schema.get("maximum", 10**6)
        options.append(st.integers(lo - 1, min(hi + 1, 2**62)))
        options.append(st.sampled_from([lo, hi]).map(float))
    if "array" in kinds:
        options.append(st.lists(_near(schema.get("items", {})), max_size=3))
    if "object" in kinds:
        props = schema.get("properties", {})
        fields = {k: _near(v) for k, v in props.items()}
        options.append(
            st.fixed_dictionaries({}, optional={**fields, "extra": json_leaf})
            if fields
            else st.dictionaries(st.text(max_size=3), json_leaf, max_size=2)
        )
    return st.one_of(options)


def test_request_validation_is_json_schema(node: Node) -> None:
    """What the server accepts is exactly what the document's schemas accept (checked against
    an independent JSON Schema implementation, jsonschema_rs)."""
    doc = httpx.get(node.http_url + "/openapi.json", timeout=10).json()
    schemas = []
    for item in doc["paths"].values():
        for op in item.values():
            schemas += [p["schema"] for p in op["parameters"]]
            body = op.get("requestBody")
            if body is not None:
                schemas.append(body["content"]["application/json"]["schema"])
    unique = {json.dumps(s, sort_keys=True): s for s in schemas}
    assert len(unique) > 20

    for schema in unique.values():
        _agrees_with_reference(schema)


def _agrees_with_reference(schema: dict[str, Any]) -> None:
    reference = jsonschema_rs.validator_for(schema)

    @settings(max_examples=60, derandomize=True, database=None, deadline=None)
    @given(_near(schema))
    def agrees(value: Any) -> None:
        try:
            validate(schema, value)
            ours = True
        except GB6Error:
            ours = False
        assert ours == reference.is_valid(value), (schema, value)

    agrees()
