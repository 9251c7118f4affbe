"""Is there a committed record after these offsets? The test a recovering persister needs.
And where does the log end now (`end_offsets`)?

A consumer's `resume` offsets cannot say by themselves that it reached the end of a partition:
Kafka's transaction markers and aborted records take offsets of their own, so the last record a
consumer delivered is usually not the partition's last offset. This asks the broker instead: a
fresh `read_committed` consumer, assigned every partition at the given offsets with
`enable.partition.eof`, reads until each partition reports its end (no committed record left)
or until it meets a committed record (there is more to read).

Rules:
- Blocking (confluent-kafka): its caller runs it in a worker thread it waits for
  (`trio.to_thread.run_sync`); the consumer is closed before it returns.
- Meaningful once no transaction of the topic's writer is open, e.g. right after the writer's
  `init_transactions` (which aborts its predecessor's): `read_committed` stops at the first
  open transaction, and a record after it would not be seen.
  With `before`, the answer is sound while the writer writes: below `before` every
  transaction is settled (the meter's handover point, kafka_store.py's `usage_from`).
- Bounded by `timeout_s`; a broker that does not answer in time is `unavailable`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from node.errors import INTERNAL, UNAVAILABLE, GB6Error

_POLL_S: Final = 0.2
_FETCH_WAIT_MS: Final = 10


def committed_records_after(
    bootstrap: str,
    topic: str,
    offsets: Mapping[int, int],
    *,
    before: Mapping[int, int] | None = None,
    timeout_s: float = 30.0,
) -> bool:
    """True if some partition of `topic` holds a committed record at or after its offset in
    `offsets` (a partition without one: from its beginning), and, given `before`, below its
    offset there (absent: 0). Blocking; see the module doc."""
    deadline = time.monotonic() + timeout_s
    consumer = _consumer(
        bootstrap,
        topic,
        {
            "isolation.level": "read_committed",
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "error",
            # An empty partition's end is told by a fetch answered empty, which the broker
            # holds up to this long (500 ms by default, for each fetch request): a start and
            # every recovery waited it out, about a second.
            "fetch.wait.max.ms": _FETCH_WAIT_MS,
        },
    )
    try:
        pending = set(_partitions(consumer, topic, timeout_s))
        if before is not None:
            pending = {p for p in pending if offsets.get(p, 0) < before.get(p, 0)}
        consumer.assign(
            [TopicPartition(topic, p, offsets.get(p, OFFSET_BEGINNING)) for p in sorted(pending)]
        )
        while pending:
            if time.monotonic() >= deadline:
                raise GB6Error(
                    UNAVAILABLE, f"Kafka topic {topic!r}: no end of log within {timeout_s}s"
                )
            msg = consumer.poll(_POLL_S)
            if msg is None:
                continue
            err = msg.error()
            if err is None:
                if before is None:
                    return True
                partition = msg.partition()
                if partition in pending:  # else one found done already
                    if (msg.offset() or 0) < before.get(partition, 0):
                        return True
                    pending.discard(partition)  # its next record is past `before`
                continue
            if err.code() == KafkaError._PARTITION_EOF:
                pending.discard(msg.partition())
            elif err.fatal() or err.code() == KafkaError._AUTO_OFFSET_RESET:
                raise GB6Error(INTERNAL, f"Kafka topic {topic!r}: {err.str()}")
            # Anything else is transport trouble that librdkafka retries by itself.
        return False
    except KafkaException as exc:
        raise GB6Error(UNAVAILABLE, f"Kafka topic {topic!r}: {exc}") from None
    finally:
        consumer.close()


def end_offsets(bootstrap: str, topic: str, *, timeout_s: float = 30.0) -> dict[int, int]:
    """Partition → the offset after its last record now (its high watermark): whatever was
    committed before the call lies below it. Blocking; see the module doc."""
    deadline = time.monotonic() + timeout_s
    consumer = _consumer(bootstrap, topic, {})
    try:
        ends = {}
        for p in _partitions(consumer, topic, timeout_s):
            left = deadline - time.monotonic()  # the whole call's, not each partition's
            if left <= 0:
                raise GB6Error(UNAVAILABLE, f"Kafka topic {topic!r}: no end within {timeout_s}s")
            ends[p] = int(consumer.get_watermark_offsets(TopicPartition(topic, p), left)[1])
        return ends
    except KafkaException as exc:
        raise GB6Error(UNAVAILABLE, f"Kafka topic {topic!r}: {exc}") from None
    finally:
        consumer.close()


def _consumer(bootstrap: str, topic: str, config: Mapping[str, Any]) -> Consumer:
    try:
        return Consumer(
            {
                "bootstrap.servers": bootstrap,
                "client.id": "gb6-tail",
                "group.id": "gb6-tail",  # required by the client; never joined (assign only)
                "enable.auto.commit": False,
                **config,
            }
        )
    except KafkaException as exc:
        raise GB6Error(UNAVAILABLE, f"Kafka topic {topic!r}: {exc}") from None


def _partitions(consumer: Consumer, topic: str, timeout_s: float) -> list[int]:
    """The topic's partitions, in order; `unavailable` if the broker does not know it."""
    meta = consumer.list_topics(topic, timeout_s)
    found = meta.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        why = found.error if found is not None else "missing"
        raise GB6Error(UNAVAILABLE, f"Kafka topic {topic!r}: {why}")
    return sorted(found.partitions)
