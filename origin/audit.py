"""The audit log's pure core: records, their canonical encoding, the hash chain, the anchor and
`verify`. No I/O and no Trio; `origin/audit_log.py` is the component around it.

Records. A record is what happened (`action`, e.g. `token.issue`), who did it (`actor`), to
which tenant (`org`, `instance`) and object (`target`), how it ended (`outcome`: ok, denied or
failed) and a small JSON object of `details`. The log gives it `seq` (gapless from 1), `ts`
(ms since the epoch), `prev` (the previous record's hash; 32 zero bytes for the first) and
`hash`.

Canonical encoding. `canonical(r)` is the UTF-8 JSON array
`[1, seq, ts, actor, action, org, instance, target, outcome, details]` with no whitespace and
object keys sorted at every depth (orjson). Details hold only strings, booleans, null, integers
within ±2**53 (what every JSON reader keeps exact), lists and objects with string keys, at most
`AuditLimits.details_depth` deep and `details_bytes` encoded: no floats, so no two encoders can
disagree about the bytes. Stores keep `details` as this exact text, never as a re-encoded
`jsonb`.

The chain. `hash = SHA-256(prev || canonical(record))`. Each record stores its `prev`: not
needed to check the chain (the previous record's hash is), but it is what lets `verify` say
which kind of tampering it found, not only where.

The anchor: the chain's head (seq, hash) kept outside the log, rewritten after every committed
batch, before anyone is told the batch is durable. So every acknowledged record lies inside the
anchored prefix, and removing the newest records (which leaves a perfectly valid, shorter
chain) shows as a log that ends before its anchor. Records after the anchor are not a problem:
they were appended after it was last written (`verify` reads the anchor before the log).
With a key (`GB6_AUDIT_KEY`), the anchor also carries HMAC-SHA256(key, "seq:hash"): whoever can
rewrite both the log and the anchor's store (a database administrator, when the anchor lives in
a kv on the same PostgreSQL) still cannot forge a matching anchor without the key, which only
the origin process and the verifier hold. Without a key the anchor is unauthenticated, which is
still enough against everyone who can edit the log but not the anchor.

`verify` walks the records in seq order and reports the FIRST problem: a record whose content
no longer matches its hash (edited), a rewritten record whose hash was recomputed (edited: the
next one still chains to the old hash), a seq gap or a renumbered tail (deleted), a record that
is not part of the chain (inserted), two records that traded places (reordered); then, at the
end, a log that ends before its anchor (truncated), a record at the anchor's seq that is not the
anchored one (rewritten: hashes recomputed from some record on), or an anchor that is missing or
whose MAC is wrong.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

import attrs
import orjson

from node.errors import invalid

VERSION: Final = 1  # the canonical encoding's version, its first element
GENESIS: Final = bytes(32)  # the `prev` of the first record
OUTCOMES: Final = ("ok", "denied", "failed")
_ACTION: Final = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")
_MAX_INT: Final = 1 << 53
_RENUMBER_SEARCH: Final = 64  # how far `verify` looks for a tail renumbered after a deletion


@attrs.frozen
class AuditLimits:
    """Sizes, rates and counts of the audit log (defaults; an operator may change them)."""

    details_bytes: int = 4096  # one record's encoded details
    details_depth: int = 4
    text_chars: int = 200  # actor, org, instance, target
    action_chars: int = 64
    batch: int = 256  # records per commit
    pending: int = 10_000  # records queued by callers that do not wait (`record_soon`)
    page: int = 200  # records per query page, at most
    refusal_window_s: float = 60.0  # refused hellos: one record per kind, then one count
    refusal_kinds: int = 64  # distinct (reason, instance) per window; more share one kind

    def __attrs_post_init__(self) -> None:
        # Set from the config's `[audit]`: each at least its floor, so the shard's own records
        # (ids, actions such as org.member.token.revoke, their details) always fit.
        for name, floor in _LIMIT_FLOORS.items():
            value = getattr(self, name)
            kind = float if name == "refusal_window_s" else int
            if isinstance(value, bool) or not isinstance(value, (kind, int)) or value < floor:
                raise invalid(f"[audit] {name} must be a number of at least {floor}")


_LIMIT_FLOORS: Final[dict[str, float]] = {
    "details_bytes": 1024,
    "details_depth": 2,
    "text_chars": 64,
    "action_chars": 32,
    "batch": 1,
    "pending": 1,
    "page": 1,
    "refusal_window_s": 0.1,
    "refusal_kinds": 1,
}


def _text(value: object, what: str, max_chars: int, *, optional: bool) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= max_chars:
        raise invalid(f"audit {what} must be a string of 1 to {max_chars} characters")
    return value


def _check_json(value: object, depth: int, limits: AuditLimits) -> None:
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not -_MAX_INT <= value <= _MAX_INT:
            raise invalid("audit details: integers must be within ±2**53")
        return
    if depth >= limits.details_depth:
        raise invalid(f"audit details nest at most {limits.details_depth} deep")
    if isinstance(value, list | tuple):
        for item in value:
            _check_json(item, depth + 1, limits)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise invalid("audit details: object keys must be strings")
            _check_json(item, depth + 1, limits)
        return
    raise invalid(f"audit details cannot hold {type(value).__name__} (no floats)")


def encode_details(details: Mapping[str, Any] | None, limits: AuditLimits) -> str:
    """`details` as canonical JSON text, checked against the limits (`invalid` otherwise)."""
    value = dict(details or {})
    _check_json(value, 0, limits)
    try:
        raw = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:  # a str subclass or the like that orjson refuses
        raise invalid(f"audit details: {exc}") from None
    if len(raw) > limits.details_bytes:
        raise invalid(f"audit details are {len(raw)} bytes; the limit is {limits.details_bytes}")
    return raw.decode()


@attrs.frozen
class AuditEntry:
    """What a caller records; the log adds seq, ts and the hashes. Validated at construction
    through `entry(...)`; `details` is the canonical JSON text."""

    actor: str
    action: str
    org: str | None
    instance: str | None
    target: str | None
    outcome: str
    details: str


def entry(
    *,
    actor: str,
    action: str,
    org: str | None = None,
    instance: str | None = None,
    target: str | None = None,
    outcome: str = "ok",
    details: Mapping[str, Any] | None = None,
    limits: AuditLimits = AuditLimits(),
) -> AuditEntry:
    """A checked entry; bad input is GB6Error `invalid` (and nothing is recorded)."""
    if not isinstance(action, str) or not (
        len(action) <= limits.action_chars and _ACTION.fullmatch(action)
    ):
        raise invalid(
            f"audit action must be dotted lowercase words (e.g. token.issue), at most"
            f" {limits.action_chars} characters"
        )
    if outcome not in OUTCOMES:
        raise invalid(f"audit outcome must be one of {', '.join(OUTCOMES)}")
    n = limits.text_chars
    return AuditEntry(
        actor=_text(actor, "actor", n, optional=False) or "",
        action=action,
        org=_text(org, "org", n, optional=True),
        instance=_text(instance, "instance", n, optional=True),
        target=_text(target, "target", n, optional=True),
        outcome=outcome,
        details=encode_details(details, limits),
    )


@attrs.frozen
class AuditRecord:
    """One record as the log stores it."""

    seq: int
    ts: int
    actor: str
    action: str
    org: str | None
    instance: str | None
    target: str | None
    outcome: str
    details: str  # canonical JSON text
    prev: bytes
    hash: bytes

    def to_json(self) -> dict[str, Any]:
        """The record as the admin API shows it (ts in ms; the hash in hex for cross-checks)."""
        return {
            "seq": self.seq,
            "ts": self.ts,
            "actor": self.actor,
            "action": self.action,
            "org": self.org,
            "instance": self.instance,
            "target": self.target,
            "outcome": self.outcome,
            "details": orjson.loads(self.details),
            "hash": self.hash.hex(),
        }


def canonical(r: AuditRecord | AuditEntry, seq: int, ts: int) -> bytes:
    """The bytes the chain hashes for `r` at `seq` and `ts` (see the module docstring)."""
    # `details` is already canonical text: splice it in rather than parse and re-encode it.
    head = orjson.dumps(
        [VERSION, seq, ts, r.actor, r.action, r.org, r.instance, r.target, r.outcome]
    )
    return head[:-1] + b"," + r.details.encode() + b"]"


def chain_hash(prev: bytes, r: AuditRecord | AuditEntry, seq: int, ts: int) -> bytes:
    return hashlib.sha256(prev + canonical(r, seq, ts)).digest()


def seal(e: AuditEntry, seq: int, ts: int, prev: bytes) -> AuditRecord:
    """The record `e` becomes at `seq`, after the record whose hash is `prev`."""
    return AuditRecord(
        seq=seq,
        ts=ts,
        actor=e.actor,
        action=e.action,
        org=e.org,
        instance=e.instance,
        target=e.target,
        outcome=e.outcome,
        details=e.details,
        prev=prev,
        hash=chain_hash(prev, e, seq, ts),
    )


# --- the anchor --------------------------------------------------------------------------


@attrs.frozen
class Anchor:
    """The chain's head as last written outside the log: seq 0 is the empty chain."""

    seq: int
    hash: bytes
    mac: bytes | None = None

    @staticmethod
    def head(seq: int, hash_: bytes, key: bytes | None) -> Anchor:
        return Anchor(seq, hash_, None if key is None else _mac(key, seq, hash_))

    def encode(self) -> bytes:
        fields: dict[str, Any] = {"seq": self.seq, "hash": self.hash.hex()}
        if self.mac is not None:
            fields["mac"] = self.mac.hex()
        return orjson.dumps(fields)

    @staticmethod
    def decode(raw: bytes) -> Anchor:
        """The anchor in `raw`; `invalid` if it is not one."""
        try:
            fields = orjson.loads(raw)
            seq, hash_ = fields["seq"], bytes.fromhex(fields["hash"])
            mac = bytes.fromhex(fields["mac"]) if "mac" in fields else None
        except (ValueError, KeyError, TypeError) as exc:
            raise invalid(f"the audit anchor is unreadable: {exc}") from None
        if not isinstance(seq, int) or seq < 0 or len(hash_) != 32:
            raise invalid("the audit anchor is unreadable: bad seq or hash")
        return Anchor(seq, hash_, mac)

    def authentic(self, key: bytes) -> bool:
        return self.mac is not None and hmac.compare_digest(
            self.mac, _mac(key, self.seq, self.hash)
        )


def _mac(key: bytes, seq: int, hash_: bytes) -> bytes:
    return hmac.new(key, f"{seq}:{hash_.hex()}".encode(), hashlib.sha256).digest()


# --- verification ------------------------------------------------------------------------


class Problem(enum.Enum):
    EDITED = "edited"
    DELETED = "deleted"
    INSERTED = "inserted"
    REORDERED = "reordered"
    TRUNCATED = "truncated"
    REWRITTEN = "rewritten"
    ANCHOR = "anchor"


@attrs.frozen
class Finding:
    """The first problem: its kind, the seq of the bad record (or where the log ends) and what
    is wrong, in words."""

    problem: Problem
    seq: int
    message: str


@attrs.frozen
class Report:
    records: int  # how many were read
    head: int  # the last seq read (0 for an empty log)
    anchor: Anchor | None
    finding: Finding | None
    mac_checked: bool

    @property
    def ok(self) -> bool:
        return self.finding is None

    def summary(self) -> str:
        if self.finding is not None:
            f = self.finding
            return f"audit log BAD at seq {f.seq}: {f.problem.value}: {f.message}"
        if self.anchor is None:
            return "audit log OK: empty, no anchor yet"
        past = self.head - self.anchor.seq
        mac = "MAC checked" if self.mac_checked else "anchor MAC not checked (no key)"
        extra = f"; {past} record(s) past the anchor (appended since)" if past else ""
        return (
            f"audit log OK: {self.records} record(s), seq 1..{self.head}, anchored at seq"
            f" {self.anchor.seq}{extra}; {mac}"
        )


def _fits(r: AuditRecord, seq: int, prev: bytes) -> bool:
    """Whether `r`, taken as the record at `seq` after `prev`, hashes to its stored hash."""
    return hmac.compare_digest(chain_hash(prev, r, seq, r.ts), r.hash)


def _classify(
    r: AuditRecord,
    nxt: AuditRecord | None,
    expect: int,
    prev: bytes,
    prev_prev: bytes | None,
) -> Finding:
    """What is wrong with `r`, read where the record `expect` (after `prev`) belongs."""
    e = expect
    if r.seq > e:
        missing = f"{e}" if r.seq == e + 1 else f"{e}..{r.seq - 1}"
        return Finding(Problem.DELETED, e, f"record(s) {missing} are missing (a gap in seqs)")
    if r.seq < e:
        return Finding(
            Problem.REORDERED if r.seq < e - 1 else Problem.INSERTED,
            r.seq,
            f"a record with seq {r.seq} comes after seq {e - 1}",
        )
    if nxt is not None and nxt.prev == prev and _fits(nxt, e, prev):
        # The next record is the one that belongs here.
        if r.prev == nxt.hash and _fits(r, e + 1, nxt.hash):
            return Finding(
                Problem.REORDERED, e, f"records {e} and {e + 1} are in each other's place"
            )
        return Finding(
            Problem.INSERTED,
            e,
            f"record {e} is not part of the chain: the one after it was chained right after"
            f" seq {e - 1} (later records were renumbered)",
        )
    if r.prev == prev:
        return Finding(Problem.EDITED, e, f"record {e}'s content does not match its hash")
    if _fits(r, e, r.prev):
        if e > 1 and prev_prev is not None and r.prev == prev_prev:
            return Finding(
                Problem.INSERTED,
                e - 1,
                f"record {e - 1} is not part of the chain: record {e} was chained right after"
                f" seq {e - 2}",
            )
        return Finding(
            Problem.EDITED,
            max(e - 1, 1),
            f"record {e - 1} was rewritten (its hash recomputed): record {e} was chained to a"
            " different one",
        )
    if prev_prev is not None and r.prev == prev_prev and _fits(r, e - 1, r.prev):
        return Finding(
            Problem.INSERTED,
            e - 1,
            f"record {e - 1} is not part of the chain: the record now at seq {e} was chained"
            f" right after seq {e - 2} (later records were renumbered)",
        )
    for d in range(1, _RENUMBER_SEARCH + 1):
        if _fits(r, e + d, r.prev):
            return Finding(
                Problem.DELETED,
                e,
                f"{d} record(s) before the one now at seq {e} were deleted and the later ones"
                f" renumbered (it was seq {e + d})",
            )
    return Finding(
        Problem.EDITED,
        e,
        f"record {e} neither chains to seq {e - 1} nor matches its own hash",
    )


class Verifier:
    """Checks a log fed in seq order, page by page (`feed`), then the anchor (`finish`).

    It keeps one record back, since telling an insertion from a reordering needs the next."""

    def __init__(self, anchor: Anchor | None, key: bytes | None) -> None:
        self.anchor = anchor
        self.key = key
        self.finding: Finding | None = None
        self.records = 0
        self._expect = 1
        self._prev = GENESIS
        self._prev_prev: bytes | None = None
        self._held: AuditRecord | None = None
        self._at_anchor: bytes | None = GENESIS if anchor is not None and anchor.seq == 0 else None

    def feed(self, records: Iterable[AuditRecord]) -> bool:
        """Check these records; False once a problem is found (then feed no more)."""
        for r in records:
            if self.finding is not None:
                return False
            self.records += 1
            if self._held is not None:
                self._step(self._held, r)
            self._held = r
        return self.finding is None

    def _step(self, r: AuditRecord, nxt: AuditRecord | None) -> None:
        if self.finding is not None:
            return
        e = self._expect
        if r.seq == e and r.prev == self._prev and _fits(r, e, self._prev):
            self._prev_prev, self._prev = self._prev, r.hash
            self._expect = e + 1
            if self.anchor is not None and e == self.anchor.seq:
                self._at_anchor = r.hash
            return
        self.finding = _classify(r, nxt, e, self._prev, self._prev_prev)

    def finish(self) -> Report:
        if self._held is not None:
            self._step(self._held, None)
            self._held = None
        head = self._expect - 1
        mac_checked = False
        if self.finding is None:
            self.finding, mac_checked = self._check_anchor(head)
        return Report(self.records, head, self.anchor, self.finding, mac_checked)

    def _check_anchor(self, head: int) -> tuple[Finding | None, bool]:
        a = self.anchor
        if a is None:
            if head == 0:
                return None, False
            return Finding(
                Problem.ANCHOR,
                head,
                "the anchor is missing: the removal of the newest records cannot be ruled out",
            ), False
        if self.key is not None and not a.authentic(self.key):
            return Finding(
                Problem.ANCHOR, a.seq, "the anchor's MAC does not match (forged, or another key)"
            ), False
        if head < a.seq:
            return Finding(
                Problem.TRUNCATED,
                head + 1,
                f"the log ends at seq {head} but its anchor is at seq {a.seq}: records"
                f" {head + 1}..{a.seq} were removed",
            ), False
        if self._at_anchor is None or not hmac.compare_digest(self._at_anchor, a.hash):
            return Finding(
                Problem.REWRITTEN,
                a.seq,
                f"the record at seq {a.seq} is not the anchored one: the chain was rewritten"
                f" (hashes recomputed) from some record at or before seq {a.seq}",
            ), False
        return None, self.key is not None


def verify(
    records: Iterable[AuditRecord], anchor: Anchor | None, key: bytes | None = None
) -> Report:
    """Check `records` (in seq order, as stored) against `anchor`; see the module docstring."""
    v = Verifier(anchor, key)
    v.feed(records)
    return v.finish()


def tail_follows(records: Iterable[AuditRecord], anchor: Anchor) -> Iterator[Finding]:
    """At start: whether the records from the anchor's seq on (the anchored one first, when
    seq > 0) continue the anchored chain. Yields the first problem, if any."""
    it = iter(records)
    expect, prev = anchor.seq + 1, anchor.hash
    if anchor.seq > 0:
        first = next(it, None)
        if first is None or first.seq != anchor.seq:
            yield Finding(
                Problem.TRUNCATED,
                anchor.seq,
                f"the anchored record {anchor.seq} is missing: the newest records were removed",
            )
            return
        if not hmac.compare_digest(first.hash, anchor.hash) or not _fits(
            first, first.seq, first.prev
        ):
            yield Finding(
                Problem.REWRITTEN, anchor.seq, f"record {anchor.seq} is not the anchored one"
            )
            return
    for r in it:
        if r.seq != expect or r.prev != prev or not _fits(r, expect, prev):
            yield Finding(Problem.EDITED, expect, f"record {expect} does not continue the chain")
            return
        expect, prev = expect + 1, r.hash


# --- floods ------------------------------------------------------------------------------

RefusalKind = tuple[str, str | None]  # (reason, instance or None)
OTHER: Final[RefusalKind] = ("other", None)


class RefusalCounter:
    """Refused hellos, aggregated so an attacker cannot grow the log without bound.

    Per window of `window_ms`, the first refusal of each kind (reason, instance) is recorded at
    once (`note` says True); later ones of that kind are only counted, and once the window is
    over `due` hands back one count per kind. Kinds are bounded too: past `kinds` distinct ones
    in a window, the rest share the kind `other`. So a window costs at most 2 * (kinds + 1)
    records, whatever the flood.
    """

    def __init__(self, window_ms: int, kinds: int) -> None:
        self.window_ms = max(1, window_ms)
        self.kinds = kinds
        self._start: int | None = None
        self._counts: dict[RefusalKind, int] = {}  # refusals after the first, this window
        self._closed: list[tuple[RefusalKind, int, int, int]] = []

    def _roll(self, now: int) -> None:
        if self._start is not None and now >= self._start + self.window_ms:
            end = self._start + self.window_ms
            self._closed += [(k, n, self._start, end) for k, n in self._counts.items() if n]
            self._start, self._counts = None, {}
        if self._start is None:
            self._start = now

    def note(self, reason: str, instance: str | None, now: int) -> tuple[RefusalKind, bool]:
        """Count one refusal; its kind, and whether to record it now (first of its kind)."""
        self._roll(now)
        kind: RefusalKind = (reason, instance)
        if kind not in self._counts and len(self._counts) >= self.kinds:
            kind = OTHER
        if kind not in self._counts:
            self._counts[kind] = 0
            return kind, True
        self._counts[kind] += 1
        return kind, False

    def due(self, now: int) -> list[tuple[RefusalKind, int, int, int]]:
        """(kind, count, window start, window end) of the refusals not yet recorded, for the
        windows that are over."""
        self._roll(now)
        closed, self._closed = self._closed, []
        return closed
