"""One participant's ICE + DTLS + SRTP transport, on aiortc's transports (asyncio side).

Rules:
- aiortc's RTCRtpReceiver/RTCRtpSender are never created: `_TapDtls` hands every decrypted RTP
  and RTCP packet to the forwarder as bytes, and `send_rtp`/`send_rtcp` protect and send on the
  nominated ICE pair synchronously (one SRTP call and one `sendto`, no coroutine per packet).
  Relayed (TURN) pairs go through a bounded queue drained by `serve`; overflow is dropped
  (real-time media is better lost than late) and counted.
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


class _PinnedConnection(aice.Connection):
    """aioice Connection whose host candidates are the configured address and port range."""

    def __init__(self, media: MediaConfig, **kwargs: Any) -> None:
        super().__init__(ice_controlling=False, **kwargs)
        self._media = media

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
                    lambda: aice.StunProtocol(self), local_addr=(media.host, port)
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
        self.dropped = 0
        self.sent = 0

    @property
    def connected(self) -> bool:
        return self._dtls._state == State.CONNECTED

    @property
    def dtls_state(self) -> str:
        return self._dtls.state

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
        candidates: list[RTCIceCandidate],
        *,
        end_of_candidates: bool,
        controlling: bool,
        dtls_role: str,
        on_connected: Callable[[], None],
    ) -> bool:
        """Connect (ICE with `candidates`, then end-of-candidates if known; then DTLS), call
        `on_connected`, then drain the relayed-send queue until cancelled. Returns False when
        the connection failed. Cancelling it (the Trio task that owns it) stops sending;
        `close` releases the sockets."""
        self._conn.ice_controlling = controlling
        for c in candidates:
            await self.add_candidate(c)
        if end_of_candidates:
            await self.add_candidate(None)
        self._dtls._set_role(dtls_role)
        await self._ice.start(ice)
        if self._ice.state != "completed":
            log.info("ICE failed (%s)", self._ice.state)
            return False
        await self._dtls.start(dtls)
        if self._dtls._state != State.CONNECTED:
            log.info("DTLS failed (%s)", self._dtls.state)
            return False
        on_connected()
        while True:
            data = await self._slow.get()
            pair = self._conn._nominated.get(1)
            if pair is not None:
                with contextlib.suppress(ConnectionError, OSError):
                    await pair.protocol.send_data(data, pair.remote_addr)

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
        if type(pair.protocol) is aice.StunProtocol:
            transport = pair.protocol.transport
            if transport is not None:
                transport.sendto(data, pair.remote_addr)
            return
        try:
            self._slow.put_nowait(data)
        except asyncio.QueueFull:
            self.dropped += 1

    def send_rtp(self, data: bytes) -> None:
        self._send(data, False)

    def send_rtcp(self, data: bytes) -> None:
        self._send(data, True)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._dtls.stop()
        with contextlib.suppress(Exception):
            await self._ice.stop()
