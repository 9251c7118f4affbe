"""One participant's ICE + DTLS + SRTP transport, on aiortc's transports (asyncio side).

Rules:
- aiortc's RTCRtpReceiver/RTCRtpSender are never created. `_TapDtls` hands decrypted RTP/RTCP
  to the forwarder as bytes during the handshake; once DTLS is up, `_FastStunProtocol` takes
  SRTP/SRTCP datagrams (first byte 128..191) straight from the socket callback, decrypts and
  forwards them synchronously, and drains up to `_DRAIN` more queued datagrams per readable
  event (no STUN parse, no queue, no task wake-up per packet: the event loop's per-datagram
  cost was most of the SFU's CPU). SRTP authenticates them, so the sender address is not
  checked again.
- `send_rtp`/`send_rtcp` protect and send synchronously: on a host pair the socket is
  connected to the nominated remote (the kernel keeps the route) and written directly; a full
  socket buffer drops the packet (real-time media is better lost than late) and counts it.
  Relayed (TURN) pairs go through a bounded queue drained by `serve`.
- Host candidates are pinned: one UDP socket per component bound to `[media] host` on a port
  of `udp_port_min..udp_port_max`, announced as `announced_address` when set. aioice's own
  interface enumeration is never used, and only the configured ICE servers are (none by default).
- Everything here runs in the asyncio loop that trio_asyncio opened; the Trio layer calls
  `gather`, `serve`, `add_candidate` and `close` through `aio_as_trio`, and the packet callbacks
  run synchronously in that loop (the same thread as Trio).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Callable
from typing import Any

import pylibsrtp
from aioice import Candidate
from aioice import ice as aice
from aioice.candidate import candidate_foundation, candidate_priority
from aiortc.rtcconfiguration import RTCIceServer
from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsParameters, RTCDtlsTransport, State
from aiortc.rtcicetransport import (
    RTCIceCandidate,
    RTCIceGatherer,
    RTCIceParameters,
    RTCIceTransport,
    candidate_from_aioice,
    connection_kwargs,
)

from node.config import MediaConfig
from node.errors import GB6Error

log = logging.getLogger("gb6.sfu")

_SLOW_QUEUE = 1_024
# aioice queues every datagram that is not STUN (DTLS records, here) for `recv`, from any
# sender and without a bound: past this many waiting, a datagram is dropped, as UDP may drop it.
_ICE_QUEUE = 1_024
_DRAIN = 64  # datagrams read per readable event, past the first
_MAX_DATAGRAM = 65_536
_CERTIFICATE: RTCCertificate | None = None


def certificate() -> RTCCertificate:
    """One DTLS certificate per process: generating one costs ~ms and peers only check its
    fingerprint, which is in every description we send."""
    global _CERTIFICATE
    if _CERTIFICATE is None:
        _CERTIFICATE = RTCCertificate.generateCertificate()
    return _CERTIFICATE


def ice_servers(media: MediaConfig) -> list[RTCIceServer]:
    return [
        RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
        for s in media.ice_servers
    ]


class _FastStunProtocol(aice.StunProtocol):
    """aioice's UDP protocol, with SRTP/SRTCP datagrams (first byte 128..191, which STUN and
    DTLS never start with) handed to `Connection.fast_rx` synchronously once DTLS is up:
    no STUN parse attempt, no queue, no task wake-up per packet."""

    def datagram_received(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        rx = self.receiver.fast_rx  # type: ignore[attr-defined]
        if rx is None or not isinstance(data, bytes):
            super().datagram_received(data, addr)
            return
        self._one(rx, data, addr)
        self._drain(rx)

    def _drain(self, rx: Callable[[bytes], None]) -> None:
        # Media comes in bursts (a video frame is many packets): read what else is queued
        # now, so one event-loop wake-up serves up to _DRAIN datagrams instead of one.
        sock = getattr(self.transport, "_sock", None)
        if sock is None:
            return
        for _ in range(_DRAIN):
            try:
                data, addr = sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # asyncio's own reader reports it on its next call
            self._one(rx, data, addr)

    def _one(self, rx: Callable[[bytes], None], data: bytes, addr: tuple[Any, ...]) -> None:
        if data and 127 < data[0] < 192:
            rx(data)
        else:
            super().datagram_received(data, addr)


class _PinnedConnection(aice.Connection):
    """aioice Connection whose host candidates are the configured address and port range."""

    def __init__(self, media: MediaConfig, **kwargs: Any) -> None:
        super().__init__(ice_controlling=False, **kwargs)
        self._media = media
        self.fast_rx: Callable[[bytes], None] | None = None
        self.dropped_datagrams = 0  # over `_ICE_QUEUE`

    def data_received(self, data: bytes, component: int) -> None:
        if self._queue.qsize() >= _ICE_QUEUE:
            self.dropped_datagrams += 1
            return
        super().data_received(data, component)

    async def get_component_candidates(
        self,
        component: int,
        addresses: list[str],
        timeout: int = 5,  # noqa: ASYNC109 (aioice's signature)
    ) -> list[Candidate]:
        del addresses  # aioice's interface list: never used, see the module rules
        media = self._media
        loop = asyncio.get_running_loop()
        span = media.udp_port_max - media.udp_port_min + 1
        start = random.randrange(span)
        protocol: aice.StunProtocol | None = None
        for i in range(span):
            port = media.udp_port_min + (start + i) % span
            try:
                _, proto = await loop.create_datagram_endpoint(
                    lambda: _FastStunProtocol(self), local_addr=(media.host, port)
                )
            except OSError:
                continue
            protocol = proto
            break
        if protocol is None:
            raise GB6Error("unavailable", "no free UDP port in [media] udp_port_min..udp_port_max")
        sock = protocol.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        bound = protocol.transport.get_extra_info("sockname")
        address = media.announced_address or bound[0]
        protocol.local_candidate = Candidate(
            foundation=candidate_foundation("host", "udp", address),
            component=component,
            transport="udp",
            priority=candidate_priority(component, "host"),
            host=address,
            port=bound[1],
            type="host",
        )
        self._protocols.append(protocol)
        candidates = [protocol.local_candidate]
        extra: list[Candidate] = []
        if self.stun_server:
            with contextlib.suppress(Exception):
                cand = await asyncio.wait_for(
                    aice.server_reflexive_candidate(protocol, self.stun_server), timeout
                )
                extra.append(cand[0] if isinstance(cand, tuple) else cand)
        if self.turn_server:
            # aioice gathers the relayed candidate when given no host address.
            extra += await super().get_component_candidates(component, [], timeout)
        return candidates + extra


class _TapDtls(RTCDtlsTransport):
    """aiortc's DTLS/SRTP transport with the RTP router replaced by our callbacks."""

    def __init__(
        self,
        ice: RTCIceTransport,
        on_rtp: Callable[[bytes], None],
        on_rtcp: Callable[[bytes], None],
    ) -> None:
        super().__init__(ice, [certificate()])
        self._on_rtp = on_rtp
        self._on_rtcp = on_rtcp

    async def _handle_rtp_data(self, data: bytes, arrival_time_ms: int) -> None:
        self._on_rtp(data)

    async def _handle_rtcp_data(self, data: bytes) -> None:
        self._on_rtcp(data)


class PeerTransport:
    """ICE (pinned), DTLS and SRTP for one participant; see the module rules."""

    def __init__(
        self,
        media: MediaConfig,
        on_rtp: Callable[[bytes], None],
        on_rtcp: Callable[[bytes], None],
    ) -> None:
        self._media = media
        gatherer = RTCIceGatherer(iceServers=ice_servers(media))
        conn = _PinnedConnection(media, **connection_kwargs(ice_servers(media)))
        gatherer._connection = conn
        self._conn = conn
        self._gatherer = gatherer
        self._ice = RTCIceTransport(gatherer)
        self._dtls = _TapDtls(self._ice, on_rtp, on_rtcp)
        self._slow: asyncio.Queue[bytes] = asyncio.Queue(_SLOW_QUEUE)
        self._on_rtp = on_rtp
        self._on_rtcp = on_rtcp
        # Set once connected: (protect, protect_rtcp, sendto, remote address).
        self._tx: tuple[Any, Any, Callable[[bytes, Any], Any], Any] | None = None
        self._tx_connected: tuple[Any, Any, Callable[[bytes], Any]] | None = None
        self.trickle_open = False
        self.dropped = 0
        self.sent = 0

    @property
    def connected(self) -> bool:
        return self._dtls._state == State.CONNECTED

    @property
    def dtls_state(self) -> str:
        return self._dtls.state

    def set_controlling(self, controlling: bool) -> None:
        """The ICE role, known from who offered first: set before our description leaves,
        since the remote's checks may arrive before `serve` starts (a wrong role then would
        be "repaired" into both sides controlled)."""
        self._conn.ice_controlling = controlling

    async def gather(self) -> tuple[RTCIceParameters, list[RTCIceCandidate], list[Any]]:
        """Bind the sockets; our ICE parameters, candidates and DTLS fingerprints."""
        await self._gatherer.gather()
        return (
            self._gatherer.getLocalParameters(),
            [candidate_from_aioice(c) for c in self._conn.local_candidates],
            self._dtls.getLocalParameters().fingerprints,
        )

    async def add_candidate(self, candidate: RTCIceCandidate | None) -> None:
        if candidate is not None:
            candidate.sdpMid = candidate.sdpMid or "0"
        await self._ice.addRemoteCandidate(candidate)

    async def serve(
        self,
        ice: RTCIceParameters,
        dtls: RTCDtlsParameters,
        candidates: list[RTCIceCandidate | None],
        *,
        controlling: bool,
        dtls_role: str,
        on_connected: Callable[[], None],
    ) -> bool:
        """Connect (ICE, then DTLS), call `on_connected`, then drain the relayed-send queue
        until cancelled. Returns False when the connection failed. Cancelling it (the Trio task
        that owns it) stops sending; `close` releases the sockets.

        `candidates` (None: end of candidates) is the caller's buffer: it may grow while this
        adds them, and once `trickle_open` is True the caller calls `add_candidate` itself, so
        trickled candidates always come after the description's, in order."""
        self._conn.ice_controlling = controlling
        i = 0
        while i < len(candidates):
            await self.add_candidate(candidates[i])
            i += 1
        self.trickle_open = True  # no await since the last length check: nothing is missed
        self._dtls._set_role(dtls_role)
        await self._ice.start(ice)
        if self._ice.state != "completed":
            log.info("ICE failed (%s)", self._ice.state)
            return False
        await self._dtls.start(dtls)
        if self._dtls._state != State.CONNECTED:
            log.info("DTLS failed (%s)", self._dtls.state)
            return False
        self._fast_path()
        on_connected()
        while True:
            data = await self._slow.get()
            pair = self._conn._nominated.get(1)
            if pair is not None:
                with contextlib.suppress(ConnectionError, OSError):
                    await pair.protocol.send_data(data, pair.remote_addr)

    def _fast_path(self) -> None:
        """After DTLS: receive SRTP synchronously, and send straight to the nominated pair's
        socket (host pairs; relayed pairs keep the queue)."""
        dtls = self._dtls
        rx = dtls._rx_srtp
        on_rtp, on_rtcp = self._on_rtp, self._on_rtcp

        def fast_rx(data: bytes) -> None:
            try:
                if len(data) > 1 and 192 <= data[1] <= 223:
                    on_rtcp(rx.unprotect_rtcp(data))
                else:
                    on_rtp(rx.unprotect(data))
            except pylibsrtp.Error:
                self.dropped += 1

        self._conn.fast_rx = fast_rx
        pair = self._conn._nominated.get(1)
        if pair is not None and isinstance(pair.protocol, _FastStunProtocol):
            transport = pair.protocol.transport
            sock = getattr(transport, "_sock", None)  # asyncio's: skip its per-call checks
            tx = dtls._tx_srtp
            if sock is not None and len(self._conn._protocols) == 1:
                # One socket, one remote from now on: connect it, so the kernel keeps the
                # route instead of looking it up per packet (aioice's own sendto still works).
                try:
                    sock.connect(pair.remote_addr)
                except OSError:
                    pass
                else:
                    self._tx_connected = (tx.protect, tx.protect_rtcp, sock.send)
                    return
            sendto = sock.sendto if sock is not None else transport.sendto
            self._tx = (tx.protect, tx.protect_rtcp, sendto, pair.remote_addr)

    def send_rtp(self, data: bytes) -> None:
        """Protect and send now (never blocks; a full socket buffer drops the packet)."""
        conn = self._tx_connected
        if conn is not None:
            try:
                conn[2](conn[0](data))
            except (OSError, pylibsrtp.Error):
                self.dropped += 1
            return
        fast = self._tx
        if fast is None:
            self._send(data, False)
            return
        try:
            fast[2](fast[0](data), fast[3])
            self.sent += 1
        except (OSError, pylibsrtp.Error):
            self.dropped += 1

    def send_rtcp(self, data: bytes) -> None:
        conn = self._tx_connected
        if conn is not None:
            try:
                conn[2](conn[1](data))
            except (OSError, pylibsrtp.Error):
                self.dropped += 1
            return
        fast = self._tx
        if fast is None:
            self._send(data, True)
            return
        try:
            fast[2](fast[1](data), fast[3])
        except (OSError, pylibsrtp.Error):
            self.dropped += 1

    def _send(self, data: bytes, rtcp: bool) -> None:
        dtls = self._dtls
        if dtls._state != State.CONNECTED:
            return
        pair = self._conn._nominated.get(1)
        if pair is None:
            return
        try:
            data = dtls._tx_srtp.protect_rtcp(data) if rtcp else dtls._tx_srtp.protect(data)
        except pylibsrtp.Error:
            self.dropped += 1
            return
        self.sent += 1
        try:
            self._slow.put_nowait(data)
        except asyncio.QueueFull:
            self.dropped += 1

    async def close(self) -> None:
        self._tx = self._tx_connected = None
        self._conn.fast_rx = None
        with contextlib.suppress(Exception):
            await self._dtls.stop()
        with contextlib.suppress(Exception):
            await self._ice.stop()
