"""SDP for the SFU: parse and check a client's description, build ours. No I/O.

Rules:
- One transport per participant: every m-line is BUNDLEd on the first one's ICE and DTLS
  parameters, with rtcp-mux; anything else is refused (`invalid`).
- Codecs the SFU forwards: Opus (audio), VP8 and H.264 packetization-mode 1 (video); no RTX
  (NACKs are answered with the original packet). RTCP feedback kept: nack, nack pli, ccm fir,
  goog-remb. Header extensions accepted from publishers: sdes:mid, ssrc-audio-level,
  abs-send-time; none are sent to subscribers (the forwarder strips them).
- The order of m-lines never changes: an answer echoes the offer's; our offers list every
  section ever negotiated, rejected ones with port 0.
"""

from __future__ import annotations

from typing import Any

import attrs
from aiortc import sdp as asdp
from aiortc.rtcdtlstransport import RTCDtlsFingerprint, RTCDtlsParameters
from aiortc.rtcicetransport import RTCIceCandidate, RTCIceParameters
from aiortc.rtcrtpparameters import (
    RTCRtcpFeedback,
    RTCRtpCodecParameters,
    RTCRtpHeaderExtensionParameters,
    RTCRtpParameters,
)

from node.errors import invalid

AUDIO_LEVEL_URI = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
_EXTENSIONS = (AUDIO_LEVEL_URI, MID_URI, ABS_SEND_TIME_URI)
_FEEDBACK = {("nack", None), ("nack", "pli"), ("ccm", "fir"), ("goog-remb", None)}
CODECS = {"audio": ("opus",), "video": ("vp8", "h264")}


@attrs.frozen
class Transport:
    """The remote side's transport parameters (from its first BUNDLEd m-line)."""

    ice: RTCIceParameters
    dtls: RTCDtlsParameters
    candidates: tuple[RTCIceCandidate, ...]
    end_of_candidates: bool


def parse(text: str, *, max_bytes: int, kind: str) -> asdp.SessionDescription:
    """Parse and check a client description of type `kind` ("offer" or "answer")."""
    if not isinstance(text, str) or not text.strip():
        raise invalid(f"sdp {kind}: empty")
    if len(text.encode("utf-8", "replace")) > max_bytes:
        raise invalid(f"sdp {kind}: larger than {max_bytes} bytes")
    if not text.lstrip().startswith("v=0"):
        raise invalid(f"sdp {kind}: not an SDP (must start with v=0)")
    try:
        desc = asdp.SessionDescription.parse(text)
    except Exception as exc:  # aiortc's parser raises whatever the bad line provokes
        raise invalid(f"sdp {kind}: malformed ({type(exc).__name__}: {exc})") from None
    media = [m for m in desc.media if m.kind in ("audio", "video", "application")]
    if not media:
        raise invalid(f"sdp {kind}: no media sections")
    for m in desc.media:
        if m.kind not in ("audio", "video", "application"):
            raise invalid(f"sdp {kind}: unsupported media kind {m.kind!r}")
        if m.port != 0 and not m.rtp.muxId:
            raise invalid(f"sdp {kind}: every m-line needs a=mid")
    bundle = next((g for g in desc.group if g.semantic == "BUNDLE"), None)
    live = [m for m in desc.media if m.port != 0]
    if live and (bundle is None or any(m.rtp.muxId not in bundle.items for m in live)):
        raise invalid(f"sdp {kind}: every m-line must be in one a=group:BUNDLE")
    for m in live:
        if m.kind != "application" and not m.rtcp_mux:
            raise invalid(f"sdp {kind}: rtcp-mux is required (m-line {m.rtp.muxId})")
    return desc


def transport_of(desc: asdp.SessionDescription, kind: str) -> Transport:
    live = [m for m in desc.media if m.port != 0]
    if not live:
        raise invalid(f"sdp {kind}: every m-line is rejected")
    first = live[0]
    if first.ice is None or not first.ice.usernameFragment or not first.ice.password:
        raise invalid(f"sdp {kind}: a=ice-ufrag and a=ice-pwd are required")
    if first.dtls is None or not first.dtls.fingerprints:
        raise invalid(f"sdp {kind}: a=fingerprint is required")
    return Transport(
        ice=first.ice,
        dtls=first.dtls,
        candidates=tuple(first.ice_candidates),
        end_of_candidates=first.ice_candidates_complete,
    )


def choose_codec(
    media: asdp.MediaDescription, wanted: str | None = None
) -> RTCRtpCodecParameters | None:
    """The first codec of the m-line the SFU forwards (or the one named `wanted`)."""
    names = (wanted,) if wanted else CODECS.get(media.kind, ())
    for codec in media.rtp.codecs:
        name = codec.name.lower()
        if name not in names:
            continue
        if name == "h264" and str(codec.parameters.get("packetization-mode", "0")) != "1":
            continue
        feedback = [f for f in codec.rtcpFeedback if (f.type, f.parameter) in _FEEDBACK]
        return attrs_evolve_codec(codec, feedback)
    return None


def attrs_evolve_codec(
    codec: RTCRtpCodecParameters, feedback: list[RTCRtcpFeedback]
) -> RTCRtpCodecParameters:
    return RTCRtpCodecParameters(
        mimeType=codec.mimeType,
        clockRate=codec.clockRate,
        channels=codec.channels,
        payloadType=codec.payloadType,
        rtcpFeedback=feedback,
        parameters=dict(codec.parameters),
    )


def default_feedback(kind: str) -> list[RTCRtcpFeedback]:
    if kind == "audio":
        return []
    return [
        RTCRtcpFeedback(type="nack"),
        RTCRtcpFeedback(type="nack", parameter="pli"),
        RTCRtcpFeedback(type="ccm", parameter="fir"),
        RTCRtcpFeedback(type="goog-remb"),
    ]


def accepted_extensions(media: asdp.MediaDescription) -> list[RTCRtpHeaderExtensionParameters]:
    return [e for e in media.rtp.headerExtensions if e.uri in _EXTENSIONS]


def extension_id(extensions: list[RTCRtpHeaderExtensionParameters], uri: str) -> int:
    return next((e.id for e in extensions if e.uri == uri), 0)


@attrs.frozen
class Local:
    """Our transport parameters, the same in every description we write."""

    ice: RTCIceParameters
    fingerprints: tuple[RTCDtlsFingerprint, ...]
    candidates: tuple[RTCIceCandidate, ...]
    host: str


def media_section(
    local: Local,
    *,
    kind: str,
    mid: str,
    direction: str,
    setup: str,
    codec: RTCRtpCodecParameters | None,
    extensions: list[RTCRtpHeaderExtensionParameters],
    ssrc: int | None = None,
    msid: str | None = None,
    cname: str = "gb6-sfu",
) -> asdp.MediaDescription:
    """One m-line; direction "rejected" (or no codec) gives a rejected line: port 0, inactive,
    the codec kept (a client checks it still has one in common)."""
    port = 9 if codec is not None and direction != "rejected" else 0
    fmt: list[Any] = [codec.payloadType] if codec is not None else [0 if kind == "audio" else 96]
    profile = "UDP/TLS/RTP/SAVPF"
    if kind == "application":  # data channels are not offered: always rejected
        port, fmt, profile, codec = 0, ["webrtc-datachannel"], "UDP/DTLS/SCTP", None
    m = asdp.MediaDescription(kind=kind, port=port, profile=profile, fmt=fmt)
    m.host = "0.0.0.0"
    m.direction = "inactive" if direction == "rejected" else direction
    m.rtp = RTCRtpParameters(
        codecs=[codec] if codec is not None else [],
        headerExtensions=list(extensions),
        muxId=mid,
    )
    m.rtcp_host = "0.0.0.0"
    m.rtcp_port = 9
    m.rtcp_mux = True
    if ssrc is not None and direction in ("sendonly", "sendrecv"):
        m.ssrc = [asdp.SsrcDescription(ssrc=ssrc, cname=cname, msid=msid)]
        m.msid = msid
    m.ice = local.ice
    m.ice_candidates = list(local.candidates)
    m.ice_candidates_complete = True
    m.dtls = RTCDtlsParameters(fingerprints=list(local.fingerprints), role=setup)
    return m


def session(sections: list[asdp.MediaDescription], kind: str, version: int) -> str:
    desc = asdp.SessionDescription()
    desc.origin = f"- 4611731400430051336 {version} IN IP4 0.0.0.0"
    desc.msid_semantic.append(asdp.GroupDescription(semantic="WMS", items=["*"]))
    mids = [str(m.rtp.muxId) for m in sections if m.port != 0]
    if mids:
        desc.group.append(asdp.GroupDescription(semantic="BUNDLE", items=list(mids)))
    desc.media = sections
    desc.type = kind
    return str(desc)


def candidate(line: str, max_chars: int) -> RTCIceCandidate:
    """A trickled candidate (`candidate:...` or `a=candidate:...`)."""
    if not isinstance(line, str) or len(line) > max_chars:
        raise invalid(f"ice candidate: a string of at most {max_chars} characters")
    text = line.strip()
    for prefix in ("a=", "candidate:"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    try:
        return asdp.candidate_from_sdp(text)
    except Exception as exc:
        raise invalid(f"ice candidate: malformed ({type(exc).__name__})") from None
