"""The configuration file: what an operator mistypes is refused when it loads, naming the key,
never silently ignored or left to fail later (a send that waits forever, a traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import Config, Limits, load
from node.errors import INVALID, GB6Error

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[storage]\nbackend = "postgres"\n', "unknown section [storage]"),
        ("[node]\nws_prot = 1\n", "[node]: unknown key 'ws_prot'"),
        ('[cluster]\nredis = "redis://127.0.0.1"\n', "[cluster]: unknown key 'redis'"),
        ('[store]\nbackned = "kafka"\n', "[store]: unknown key 'backned'"),
        ("[limit]\nmessage_bytes = 1\n", "unknown section [limit]"),
        ('node = "x"\n', "[node] must be a table"),
        ("[limits]\nmax_inflight_appends = 0\n", "[limits] max_inflight_appends must be between"),
        ("[limits]\nmax_inflight_appends = -1\n", "[limits] max_inflight_appends must be between"),
        ('[limits]\nmessage_bytes = "1MiB"\n', "[limits] message_bytes must be an integer"),
        ("[limits]\nmessage_bytes = true\n", "[limits] message_bytes must be an integer"),
        ("[limits]\nhello_timeout_s = 0\n", "[limits] hello_timeout_s must be > 0"),
        ("[limits]\nadmin_auth_loopback = 1\n", "[limits] admin_auth_loopback must be true or"),
        ("[limits]\nfile_types_denied = [1]\n", "[limits] file_types_denied must be a list"),
        ("[limits]\nno_such_limit = 1\n", "no_such_limit"),
        ("[node]\nws_port = 70000\n", "ws_port must be a port number"),
        ('[node]\nhttp_port = "8701"\n', "http_port must be a port number"),
        ("[node]\ntyping_interval_ms = -5\n", "typing_interval_ms must be an integer >= 0"),
        ("[cluster]\nshard = 7\n", "shard must be a string"),
        ('[media]\nudp_port_min = "40000"\n', "[media] udp_port_min must be an integer"),
        ("[media]\nspeakers_top_n = 0\n", "[media] speakers_top_n must be between"),
        ('[store]\nkafka_commit_timeout_s = "x"\n', "kafka_commit_timeout_s must be a number"),
        ('[cluster]\norigins = "127.0.0.1:8702"\n', "origins must be a list"),
        ("[cluster]\npresence_sweep_s = true\n", "presence_sweep_s must be a number"),
        ("[cluster]\npresence_sweep_s = 0.1\n", "'presence_sweep_s' must be >= 0.5"),
    ],
)
def test_a_mistyped_config_is_refused_naming_the_key(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "gb6.toml"
    path.write_text(text)
    with pytest.raises(GB6Error) as info:
        load(path, {})
    assert info.value.code == INVALID
    assert says in info.value.message


def test_what_may_be_zero_is_accepted() -> None:
    """0 means something for a few limits: no idle room cache, no waiting for a batch."""
    limits = Limits(idle_room_cache_rooms=0, writer_linger_s=0, log_transaction_interval_s=0)
    assert limits.idle_room_cache_rooms == 0
    assert Config(ws_port=0, http_port=0, link_port=0).ws_port == 0


@pytest.mark.parametrize("name", ["node.toml", "cluster.toml"])
def test_the_shipped_configs_load(name: str) -> None:
    assert isinstance(load(ROOT / "configs" / name, {}), Config)


def test_media_binds_to_the_nodes_host_unless_configured_otherwise(tmp_path: Path) -> None:
    """PROTOCOL.md: `--host ADDR` (default 127.0.0.1); media also binds to it and announces
    it unless configured otherwise."""
    assert load(None, {}).media.host == "127.0.0.1"
    assert load(None, {"host": "127.0.0.2"}).media.host == "127.0.0.2"
    path = tmp_path / "gb6.toml"
    path.write_text('[node]\nhost = "127.0.0.3"\n')
    assert load(path, {}).media.host == "127.0.0.3"
    path.write_text('[node]\nhost = "127.0.0.3"\n[media]\nhost = "127.0.0.4"\n')
    assert load(path, {"host": "127.0.0.2"}).media.host == "127.0.0.4"


def test_the_sample_link_secret_serves_only_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/cluster.toml's secret is there for a cluster on one machine; an origin whose
    link listens beyond loopback with it would let anyone who read the file join the cluster."""
    from node.cluster import SAMPLE_SECRET, link_secret

    monkeypatch.delenv("GB6_LINK_SECRET", raising=False)
    assert link_secret(Config(link_secret=SAMPLE_SECRET), listening=True) == SAMPLE_SECRET
    with pytest.raises(GB6Error) as info:
        link_secret(Config(link_secret=SAMPLE_SECRET, host="10.1.2.3"), listening=True)
    assert "sample" in info.value.message
    # An edge only shows it, on links to its origins: it may listen for clients anywhere.
    assert link_secret(Config(link_secret=SAMPLE_SECRET, host="10.1.2.3")) == SAMPLE_SECRET
    mine = "x" * 16
    assert link_secret(Config(link_secret=mine, host="10.1.2.3"), listening=True) == mine


def test_a_password_never_reaches_an_error_or_a_log() -> None:
    from node.log import without_password
    from replication.shard_map import open_kv

    assert without_password("redis://:hunter2@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert without_password("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert without_password("redis://h:6379/0") == "redis://h:6379/0"
    with pytest.raises(GB6Error) as info:
        open_kv("postgresql://gb6:hunter2@127.0.0.1/gb6")  # `postgres:DSN` was meant
    assert "hunter2" not in info.value.message and "gb6:***@" in info.value.message


def test_media_keeps_its_own_host_when_the_node_listens_on_a_wildcard() -> None:
    """0.0.0.0 or :: is no address a peer can reach as an ICE candidate."""
    for wildcard in ("0.0.0.0", "::"):
        assert load(None, {"host": wildcard}).media.host == "127.0.0.1"


def test_an_ipv4_client_of_a_dual_stack_listener_on_loopbackis_loopback() -> None:
    from node.listen import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("::ffff:10.0.0.1") and not is_loopback("10.0.0.1")
