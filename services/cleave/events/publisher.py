"""``EventPublisher``: events go into a bounded in-memory buffer and a background thread
sends them with kafka-python's ``KafkaProducer``.

The caller never waits: ``publish`` appends under a lock and returns; a full buffer
drops the event and counts it. The thread creates the producer (retrying while no
broker answers; what waits longer than the delivery timeout is dropped), sends batches,
and counts each event as sent when the broker acknowledges it or as dropped when the
producer gives up on it (after its retries and delivery timeout). A broker that is away
therefore costs drops, never latency; when it returns, a fresh producer connects and
events flow again. Delivery is at most once."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from cleave.events.schema import DEFAULT_TOPIC

log = logging.getLogger("cleave.events")

DROP_REASONS = ("buffer_full", "broker_unavailable", "send_failed", "unserializable", "closed")
BATCH = 500


class EventPublisher:
    """Publishes JSON events to one topic, keyed by their ``request_id``."""

    def __init__(
        self,
        bootstrap: str,
        topic: str = DEFAULT_TOPIC,
        buffer_size: int = 10_000,
        registry: CollectorRegistry | None = None,
        retries: int = 3,
        delivery_timeout_seconds: float = 10.0,
        reconnect_seconds: float = 1.0,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, not {buffer_size}")
        self.bootstrap = bootstrap
        self.topic = topic
        self.buffer_size = buffer_size
        self.retries = retries
        self.delivery_timeout_seconds = delivery_timeout_seconds
        self.reconnect_seconds = reconnect_seconds
        registry = registry if registry is not None else CollectorRegistry()
        self.sent = Counter("cleave_events_sent", "Events the Kafka broker acknowledged", registry=registry)
        self.dropped = Counter("cleave_events_dropped", "Events given up on, by reason", ["reason"],
                               registry=registry)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        self._buffer: deque[tuple[float, bytes | None, dict[str, Any]]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._stopping = threading.Event()
        self._producer = None
        self._failing = False
        self._renew = False
        # kafka-python logs every reconnect attempt; the publisher says one line per outage.
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
        self._thread = threading.Thread(target=self._run, name="cleave-events", daemon=True)
        self._thread.start()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def publish(self, event: dict[str, Any]) -> bool:
        """Queue one event; False (and counted) when it was dropped. O(1), never raises."""
        try:
            with self._wake:
                if self._closed:
                    self.dropped.labels("closed").inc()
                    return False
                if len(self._buffer) >= self.buffer_size:
                    self.dropped.labels("buffer_full").inc()
                    return False
                key = event.get("request_id")
                self._buffer.append((time.monotonic(), key.encode() if isinstance(key, str) else None, event))
                self._wake.notify()
            return True
        except Exception:
            return False

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered (for up to ``timeout`` seconds), then stop; what is left is dropped."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._stopping.set()
        self._thread.join(timeout)

    # -- the background thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._buffer and not self._closed and not self._renew:
                    self._wake.wait()
                if self._closed and (not self._buffer or self._producer is None):
                    break
            if self._renew and self._producer is not None:
                self._close_producer(timeout=0)
            if self._producer is None and not self._connect():
                self._expire()
                self._stopping.wait(self.reconnect_seconds)
                continue
            self._send_batch()
        self._shutdown()

    def _connect(self) -> bool:
        from kafka import KafkaProducer

        try:
            self._producer = KafkaProducer(
                bootstrap_servers=self.bootstrap.split(","),
                client_id="cleave-events",
                acks=1,
                retries=self.retries,
                # One request in flight per broker: a retried batch cannot overtake a later
                # one, so a request's events stay in order (and Tansu's first write to an
                # empty partition is never raced by a second).
                max_in_flight_requests_per_connection=1,
                linger_ms=5,
                max_block_ms=int(self.delivery_timeout_seconds * 500),
                request_timeout_ms=int(self.delivery_timeout_seconds * 500),
                delivery_timeout_ms=int(self.delivery_timeout_seconds * 1000),
                reconnect_backoff_max_ms=int(self.reconnect_seconds * 1000),
                bootstrap_timeout_ms=int(self.reconnect_seconds * 2000),
            )
            log.info("events producer connected", extra={"bootstrap": self.bootstrap, "topic": self.topic})
            return True
        except Exception as exc:
            if not self._failing:
                self._failing = True
                log.warning("no Kafka broker answers; events wait, then are dropped",
                            extra={"bootstrap": self.bootstrap, "error": str(exc)})
            return False

    def _expire(self) -> None:
        """Drop what waited longer than the delivery timeout without a producer to take it."""
        deadline = time.monotonic() - self.delivery_timeout_seconds
        expired = 0
        with self._wake:
            while self._buffer and self._buffer[0][0] < deadline:
                self._buffer.popleft()
                expired += 1
        if expired:
            self.dropped.labels("broker_unavailable").inc(expired)

    def _send_batch(self) -> None:
        with self._wake:
            batch = [self._buffer.popleft() for _ in range(min(BATCH, len(self._buffer)))]
        for _, key, event in batch:
            try:
                value = json.dumps(event, separators=(",", ":")).encode()
            except (TypeError, ValueError):
                self.dropped.labels("unserializable").inc()
                continue
            try:
                future = self._producer.send(self.topic, value=value, key=key)
            except Exception:
                self.dropped.labels("send_failed").inc()
                continue
            future.add_callback(self._on_sent)
            future.add_errback(self._on_send_error)

    def _on_sent(self, _) -> None:
        self.sent.inc()
        if self._failing:
            self._failing = False
            log.info("events delivered again", extra={"bootstrap": self.bootstrap, "topic": self.topic})

    def _on_send_error(self, exc: BaseException) -> None:
        self.dropped.labels("send_failed").inc()
        # A producer that lived through an outage keeps state a restarted broker refuses
        # (Tansu answers its next writes with UNKNOWN_SERVER_ERROR): start a fresh one.
        self._renew = True
        with self._wake:
            self._wake.notify()
        if not self._failing:
            self._failing = True  # one warning per outage, not one per event
            log.warning("events are being dropped", extra={"bootstrap": self.bootstrap, "error": repr(exc)})

    def _shutdown(self) -> None:
        with self._wake:
            left = len(self._buffer)
            self._buffer.clear()
        if left:
            self.dropped.labels("closed").inc(left)
        self._close_producer(timeout=2)

    def _close_producer(self, timeout: float) -> None:
        """Close the producer; what it has not sent within ``timeout`` fails and is
        counted as ``send_failed``."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=timeout)
            except Exception:
                pass
        self._renew = False
