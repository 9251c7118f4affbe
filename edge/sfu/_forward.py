"""The forwarding core: published tracks (`UpTrack`) and subscriptions (`DownTrack`). No I/O.

Rules:
- A packet from a publisher is parsed once; each subscription writes its own 12-byte header
  (its SSRC, payload type, and sequence number/timestamp = the publisher's + its offsets) in
  front of the shared tail, keeps the result in a bounded history (for NACKs), and hands it to
  its sink. Nothing is decoded.
- Offsets are fixed at the first packet after a (re)start: the subscription's sequence numbers
  continue at last+1 and its timestamps advance by the wall time that passed, so a publisher
  switch, restart (new SSRC) or unmute is seamless for the subscriber's jitter buffer.
- A video subscription (re)starts on a keyframe: until one arrives its packets are dropped and
  a keyframe is requested from the publisher (PLI), again for every packet dropped, at most
  once per `keyframe_interval_s` per track; a request inside the interval is kept and sent when
  the interval ends.
- Subscriber NACKs are answered from that subscription's history (`nack_history` packets, a
  power of two); subscriber PLI/FIR go through the same per-track limit; REMB: the minimum
  over the track's subscriptions, capped, goes to the publisher every `remb_interval_s`.
- Sinks are the transports' synchronous send functions; they must not raise.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

import attrs

from edge.sfu import _rtp
from edge.sfu._events import Kind, Source, TrackInfo, TrackStats

_pack = _rtp.pack_header


class MediaSink(Protocol):
    def send_rtp(self, data: bytes) -> None: ...

    def send_rtcp(self, data: bytes) -> None: ...


def _seq_newer(a: int, b: int) -> bool:
    """a is after b in 16-bit sequence space."""
    return a != b and ((a - b) & 0xFFFF) < 0x8000


class KeyframeLimiter:
    """At most one keyframe request per interval; one that comes too early waits for its turn."""

    __slots__ = ("count", "interval", "last", "pending")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = -1e18
        self.pending = False
        self.count = 0

    def want(self, now: float) -> bool:
        if now - self.last >= self.interval:
            self.last = now
            self.pending = False
            self.count += 1
            return True
        self.pending = True
        return False

    def due(self, now: float) -> bool:
        return self.pending and self.want(now)


class DownTrack:
    """One subscriber's copy of one published track."""

    __slots__ = (
        "_hist",
        "_mask",
        "bytes",
        "clock_rate",
        "jitter_ms",
        "last_out_at",
        "last_out_seq",
        "last_out_ts",
        "loss",
        "need_keyframe",
        "out_pt",
        "out_ssrc",
        "packets",
        "paused",
        "remb_bps",
        "retransmitted",
        "rr_at",
        "rtt_ms",
        "seq_off",
        "sink",
        "src_ssrc",
        "started",
        "subscriber",
        "track",
        "ts_off",
        "video",
    )

    def __init__(
        self, track: UpTrack, subscriber: str, sink: MediaSink, out_ssrc: int, history: int
    ) -> None:
        self.track = track
        self.subscriber = subscriber
        self.sink = sink
        self.out_ssrc = out_ssrc
        self.out_pt = track.codec_pt
        self.clock_rate = track.clock_rate
        self.video = track.kind == "video"
        self.paused = True  # until the subscriber's transport is up and the m-line negotiated
        self.need_keyframe = self.video
        self.started = False
        self.src_ssrc = -1
        self.seq_off = 0
        self.ts_off = 0
        self.last_out_seq = random.getrandbits(16)
        self.last_out_ts = random.getrandbits(32)
        self.last_out_at = 0.0
        self._mask = history - 1
        self._hist: list[bytes | None] = [None] * history
        self.packets = 0
        self.bytes = 0
        self.retransmitted = 0
        self.loss = 0.0
        self.jitter_ms = 0.0
        self.rtt_ms = 0.0
        self.rr_at = 0.0
        self.remb_bps = 0

    def restart(self) -> None:
        """Continue seamlessly from the next packet (publisher switch, restart or unmute)."""
        self.started = False
        self.need_keyframe = self.video

    def forward(self, pkt: _rtp.RtpIn, is_key: Callable[[], bool], now: float) -> bool:
        """Send `pkt` on; False when it was dropped waiting for a keyframe."""
        if self.need_keyframe:
            if not is_key():
                return False
            self.need_keyframe = False
        if not self.started or pkt.ssrc != self.src_ssrc:
            gap = max(1, int((now - self.last_out_at) * self.clock_rate)) if self.packets else 0
            self.seq_off = (self.last_out_seq + 1 - pkt.seq) & 0xFFFF
            self.ts_off = (self.last_out_ts + gap - pkt.ts) & 0xFFFFFFFF
            self.src_ssrc = pkt.ssrc
            self.started = True
        seq = (pkt.seq + self.seq_off) & 0xFFFF
        ts = (pkt.ts + self.ts_off) & 0xFFFFFFFF
        # build_rtp, inlined: this runs once per packet and subscriber.
        out = _pack(pkt.out_b0, pkt.marker | self.out_pt, seq, ts, self.out_ssrc) + pkt.tail
        if 0 < ((seq - self.last_out_seq) & 0xFFFF) < 0x8000 or not self.packets:
            self.last_out_seq = seq
            self.last_out_ts = ts
            self.last_out_at = now
        self._hist[seq & self._mask] = out
        self.packets += 1
        self.bytes += len(out)
        self.sink.send_rtp(out)
        return True

    def on_nack(self, lost: list[int]) -> int:
        """Resend what the history still holds; returns how many were resent."""
        sent = 0
        for seq in lost[:256]:
            data = self._hist[seq & self._mask]
            if data is not None and _rtp.rtp_seq(data) == seq & 0xFFFF:
                self.sink.send_rtp(data)
                sent += 1
        self.retransmitted += sent
        return sent

    def on_receiver_report(
        self, fraction_lost: int, jitter: int, lsr: int, dlsr: int, now: float
    ) -> None:
        self.loss = fraction_lost / 256.0
        self.jitter_ms = 1000.0 * jitter / self.clock_rate
        self.rr_at = now
        if lsr:
            # RTT = arrival - LSR - DLSR, in 1/65536 s (the middle 32 bits of NTP time).
            mid = (_rtp.ntp_now(now) >> 16) & 0xFFFFFFFF
            rtt = ((mid - lsr - dlsr) & 0xFFFFFFFF) / 65536.0
            if rtt < 60.0:
                self.rtt_ms = rtt * 1000.0

    def sender_report(self, now: float) -> bytes | None:
        if not self.packets:
            return None
        rtp_ts = self.last_out_ts + int((now - self.last_out_at) * self.clock_rate)
        return _rtp.sender_report(
            self.out_ssrc, _rtp.ntp_now(now), rtp_ts, self.packets, self.bytes
        )

    def stats(self) -> TrackStats:
        return TrackStats(
            track_id=self.track.track_id,
            direction="down",
            packets=self.packets,
            bytes=self.bytes,
            loss=self.loss,
            jitter_ms=round(self.jitter_ms, 2),
            rtt_ms=round(self.rtt_ms, 2),
            retransmitted=self.retransmitted,
        )


class UpTrack:
    """A published track: what its publisher sends, and the subscriptions that receive it."""

    __slots__ = (
        "_down",
        "_expected_prior",
        "_jitter",
        "_received_prior",
        "_transit",
        "audio_level_id",
        "base_seq",
        "bytes",
        "clock_rate",
        "codec",
        "codec_pt",
        "cycles",
        "downtracks",
        "feedback",
        "info",
        "keyframes",
        "kind",
        "level_count",
        "level_sum",
        "loss",
        "max_seq",
        "packets",
        "remb_cap",
        "remb_last",
        "sender_ssrc",
        "ssrcs",
        "track_id",
    )

    def __init__(
        self,
        info: TrackInfo,
        *,
        codec_pt: int,
        clock_rate: int,
        feedback: MediaSink,
        keyframe_interval: float,
        remb_cap: int,
        audio_level_id: int = 0,
    ) -> None:
        self.info = info
        self.track_id = info.track_id
        self.kind: Kind = info.kind
        self.codec = info.codec
        self.codec_pt = codec_pt
        self.clock_rate = clock_rate
        self.feedback = feedback
        self.audio_level_id = audio_level_id
        self.ssrcs: set[int] = set()
        self.sender_ssrc = random.getrandbits(32) or 1
        self.keyframes = KeyframeLimiter(keyframe_interval)
        self.remb_cap = remb_cap
        self.remb_last = 0.0
        self.downtracks: dict[str, DownTrack] = {}
        self._down: tuple[DownTrack, ...] = ()
        self.packets = 0
        self.bytes = 0
        self.level_sum = 0
        self.level_count = 0
        self.base_seq = -1
        self.max_seq = 0
        self.cycles = 0
        self._expected_prior = 0
        self._received_prior = 0
        self.loss = 0.0
        self._jitter = 0.0
        self._transit: float | None = None

    @property
    def source(self) -> Source:
        return self.info.source

    @property
    def muted(self) -> bool:
        return self.info.muted

    # -- subscriptions --------------------------------------------------------------------

    def add(self, down: DownTrack) -> None:
        self.downtracks[down.subscriber] = down
        self._down = tuple(self.downtracks.values())

    def remove(self, subscriber: str) -> DownTrack | None:
        down = self.downtracks.pop(subscriber, None)
        self._down = tuple(self.downtracks.values())
        return down

    def activate(self, down: DownTrack, now: float) -> None:
        """The subscriber can receive: start it (on a keyframe for video)."""
        if down.paused:
            down.paused = False
            down.restart()
            if down.video:
                self.request_keyframe(now)

    def set_muted(self, muted: bool, now: float) -> None:
        self.info = attrs.evolve(self.info, muted=muted)
        if not muted:
            for down in self._down:
                down.restart()
            if self.kind == "video":
                self.request_keyframe(now)

    # -- from the publisher ---------------------------------------------------------------

    def on_rtp(self, pkt: _rtp.RtpIn, now: float) -> None:
        self.packets += 1
        self.bytes += len(pkt.data)
        self._count(pkt, now)
        if self.audio_level_id:
            level = _rtp.audio_level(pkt.data, self.audio_level_id)
            if level is not None:
                self.level_sum += 127 - level
                self.level_count += 1
        if self.info.muted:
            return
        key: list[bool] = []

        def is_key() -> bool:
            if not key:
                key.append(_rtp.is_keyframe_start(self.codec, pkt.data[pkt.payload_offset :]))
            return key[0]

        waiting = False
        for down in self._down:
            if not down.paused and not down.forward(pkt, is_key, now):
                waiting = True
        if waiting:
            # Ask again (within the limit) while a subscription waits: the first PLI, or the
            # keyframe it brought, may have been lost, and a publisher's own next keyframe can
            # be minutes away. Once per packet, however many subscriptions wait.
            self.request_keyframe(now)

    def _count(self, pkt: _rtp.RtpIn, now: float) -> None:
        seq = pkt.seq
        if self.base_seq < 0:
            self.base_seq = self.max_seq = seq
        elif _seq_newer(seq, self.max_seq):
            if seq < self.max_seq:
                self.cycles += 1 << 16
            self.max_seq = seq
        # RFC 3550 A.8 interarrival jitter, in timestamp units.
        transit = now * self.clock_rate - pkt.ts
        if self._transit is not None:
            d = abs(transit - self._transit)
            if d < self.clock_rate:  # a timestamp jump (new source) is not jitter
                self._jitter += (d - self._jitter) / 16.0
        self._transit = transit

    def interval_stats(self) -> None:
        """Loss over the interval since the last call (RFC 3550 A.3)."""
        if self.base_seq < 0:
            return
        expected = self.cycles + self.max_seq - self.base_seq + 1
        exp_int = expected - self._expected_prior
        rec_int = self.packets - self._received_prior
        self._expected_prior = expected
        self._received_prior = self.packets
        self.loss = max(0.0, (exp_int - rec_int) / exp_int) if exp_int > 0 else 0.0

    # -- to the publisher -----------------------------------------------------------------

    def request_keyframe(self, now: float) -> bool:
        if self.kind != "video" or not self.ssrcs:
            return False
        if self.keyframes.want(now):
            self._send_pli()
            return True
        return False

    def _send_pli(self) -> None:
        for ssrc in self.ssrcs:
            self.feedback.send_rtcp(_rtp.pli(self.sender_ssrc, ssrc))

    def tick(self, now: float, remb_interval: float) -> None:
        """Deferred keyframe requests and the REMB estimate."""
        if self.keyframes.due(now):
            self._send_pli()
        if now - self.remb_last >= remb_interval and self.ssrcs:
            rates = [d.remb_bps for d in self._down if d.remb_bps > 0]
            if rates:
                self.remb_last = now
                bitrate = min(min(rates), self.remb_cap)
                self.feedback.send_rtcp(_rtp.remb(self.sender_ssrc, bitrate, sorted(self.ssrcs)))

    def take_level(self) -> float | None:
        """Mean loudness (0..1) of the audio since the last call, None if nothing came."""
        if not self.level_count:
            return None
        level = self.level_sum / self.level_count / 127.0
        self.level_sum = self.level_count = 0
        return level

    def stats(self) -> TrackStats:
        return TrackStats(
            track_id=self.track_id,
            direction="up",
            packets=self.packets,
            bytes=self.bytes,
            loss=round(self.loss, 4),
            jitter_ms=round(1000.0 * self._jitter / self.clock_rate, 2),
            rtt_ms=0.0,
            keyframe_requests=self.keyframes.count,
        )
