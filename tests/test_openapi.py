"""schemathesis against a live node's /openapi.json: no 5xx, and every answer conforms to the
document (status codes, content types, schemas); bad input is refused (4xx).

It runs the `st` command (schemathesis, pinned in pyproject.toml) as a subprocess with the
operator's token and bounded examples. Path parameters are pinned to a real org, instance and
user made first, so the generated calls reach the handlers, not only the 404 of an unknown id.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
        f"Authorization: Bearer {node.admin_token}",
        "--checks",
        CHECKS,
        "--max-examples",
        str(MAX_EXAMPLES),
        "--phases",
        "examples,coverage,fuzzing",
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
    # The node is still serving after all of it.
    assert node.admin("GET", f"/v1/orgs/{tenant.org}").status_code == 200
