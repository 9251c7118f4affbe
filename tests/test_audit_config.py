"""The audit log's limits come from the config's `[audit]` section (node/config.py, one way):
the log an origin opens enforces them, and bad values are refused when the config loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from node.config import load
from node.errors import GB6Error
from origin.audit import AuditLimits
from origin.audit_log import open_audit
from origin.audit_store import AuditQuery


def _config(tmp_path: Path, audit: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n\n[audit]\n{audit}')
    return path


def test_defaults_without_a_section(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[node]\n")
    assert load(path, {}).audit == AuditLimits()


async def test_the_origins_audit_log_enforces_the_configured_limits(tmp_path: Path) -> None:
    config = load(_config(tmp_path, "details_bytes = 1024\npage = 5\nbatch = 8\n"), {})
    assert (config.audit.details_bytes, config.audit.page, config.audit.batch) == (1024, 5, 8)
    assert config.audit.pending == AuditLimits().pending  # the others keep their defaults
    config.data_dir.mkdir()
    audit = open_audit(config)
    assert audit.limits == config.audit
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            await nursery.start(audit.run)
        with pytest.raises(GB6Error) as big:
            await audit.record(actor="usr_1", action="token.issue", details={"x": "y" * 1100})
        assert big.value.code == "invalid" and "1024" in big.value.message
        for i in range(7):
            await audit.record(actor=f"usr_{i}", action="token.issue", details={"x": "y" * 900})
        with pytest.raises(GB6Error) as page:
            await audit.page(AuditQuery(limit=6))
        assert page.value.code == "invalid" and "1..5" in page.value.message
        rows, cursor = await audit.page(AuditQuery(limit=5))
        assert len(rows) == 5 and cursor is not None
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "audit",
    [
        "page = 0\n",  # below its floor
        "text_chars = 10\n",  # ids would not fit
        "details_bytes = 1.5\n",  # not an integer
        "batch = true\n",
        'refusal_window_s = "60"\n',
        "refusal_window_s = 0\n",
        "pages = 10\n",  # no such limit
    ],
)
def test_bad_values_are_refused_when_the_config_loads(tmp_path: Path, audit: str) -> None:
    with pytest.raises(GB6Error) as exc:
        load(_config(tmp_path, audit), {})
    assert exc.value.code == "invalid" and "audit" in exc.value.message
