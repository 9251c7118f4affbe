"""A small reorder buffer by RTP sequence number: packets in, packets out in order, gaps counted.

Rules:
- Sequence numbers are unwrapped to unbounded ints. Nothing is released until `_STARTUP`
  packets are held (or `flush()`): output starts at the oldest of them, so a stream whose first
  packets arrive swapped does not lose the first one as "late".
- A packet older than the next one due (late, or a duplicate) is dropped and counted as `late`;
  a second copy of a held packet is dropped too.
- Packets wait while an earlier one is missing, up to `capacity` held packets; past that the
  missing ones are declared lost and output resumes at the oldest held packet. The next packet
  released then carries `lost_before`, so a depacketizer knows its frame is broken.
- A jump of more than `_RESYNC` forward (a restarted sender) flushes what is held and restarts
  at the new packet, counting the jump as loss.
No I/O, no clock: the recorder's loop drives it.
"""

from __future__ import annotations

import attrs

from edge.recording._rtp import RtpPacket, unwrap

_RESYNC = 3_000
_STARTUP = 8


@attrs.frozen(slots=True)
class Released:
    packet: RtpPacket
    seq: int  # unwrapped
    lost_before: int  # packets declared lost just before this one


@attrs.define
class ReorderBuffer:
    capacity: int
    next_seq: int | None = None
    held: dict[int, RtpPacket] = attrs.Factory(dict)
    lost: int = 0
    late: int = 0
    _pending_loss: int = 0
    _started: bool = False

    def push(self, packet: RtpPacket) -> list[Released]:
        seq = unwrap(packet.seq, self.next_seq, 16)
        out: list[Released] = []
        if self.next_seq is None:
            self.next_seq = seq
        elif seq in self.held or (self._started and seq < self.next_seq):
            self.late += 1
            return out
        elif seq - self.next_seq > _RESYNC:
            out = self.flush()
            self._skip_to(seq)
        elif seq < self.next_seq:  # not started yet: an earlier first packet
            self.next_seq = seq
        self.held[seq] = packet
        if not self._started:
            if len(self.held) < min(_STARTUP, self.capacity):
                return out
            self._started = True
        self._release(out)
        while len(self.held) > self.capacity:
            self._skip_to(min(self.held))
            self._release(out)
        return out

    def flush(self) -> list[Released]:
        """Everything held, in order, gaps declared lost (at the end of a track)."""
        self._started = True
        out: list[Released] = []
        while self.held:
            self._skip_to(min(self.held))
            self._release(out)
        return out

    def _skip_to(self, seq: int) -> None:
        assert self.next_seq is not None
        gap = seq - self.next_seq
        self.lost += gap
        self._pending_loss += gap
        self.next_seq = seq

    def _release(self, out: list[Released]) -> None:
        assert self.next_seq is not None
        while (packet := self.held.pop(self.next_seq, None)) is not None:
            out.append(Released(packet, self.next_seq, self._pending_loss))
            self._pending_loss = 0
            self.next_seq += 1
