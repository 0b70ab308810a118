"""``cleave events``: tail the request-lifecycle topic, one JSON event per line.

It reads without a consumer group (partitions assigned directly), so it starts at once
and never moves anyone's offsets: from the end by default, from the beginning with
``--from-beginning``. ``--max-events`` and ``--timeout`` make it stop by itself."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Iterator, Sequence, TextIO

from cleave.events.schema import DEFAULT_TOPIC

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


def tail(
    bootstrap: str,
    topic: str = DEFAULT_TOPIC,
    from_beginning: bool = False,
    timeout: float | None = None,
    poll_seconds: float = 0.2,
) -> Iterator[dict]:
    """Events of ``topic`` as dicts, in partition order; ends after ``timeout`` seconds
    (None: never)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=None, enable_auto_commit=False,
                             client_id="cleave-events-tail", auto_offset_reset="earliest")
    deadline = None if timeout is None else time.monotonic() + timeout

    def alive() -> bool:
        return deadline is None or time.monotonic() < deadline

    try:
        partitions = consumer.partitions_for_topic(topic)
        # A topic that does not exist yet is created by its first event: all of it is new.
        from_beginning = from_beginning or not partitions
        while not partitions and alive():
            time.sleep(poll_seconds)
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        if from_beginning:
            consumer.seek_to_beginning(*assigned)
        else:
            consumer.seek_to_end(*assigned)
        # A restarted broker with memory storage starts every offset again at 0: offsets
        # past its end reset to the earliest, so the tail goes on across the restart.
        while alive():
            for records in consumer.poll(timeout_ms=int(poll_seconds * 1000)).values():
                for record in records:
                    try:
                        yield json.loads(record.value)
                    except ValueError:
                        continue
    finally:
        consumer.close()


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    count = 0
    for event in tail(args.bootstrap, args.topic, args.from_beginning, args.timeout):
        if args.request_id and event.get("request_id") != args.request_id:
            continue
        if args.type and event.get("type") not in args.type:
            continue
        out.write(json.dumps(event, separators=(",", ":")) + "\n")
        out.flush()
        count += 1
        if args.max_events and count >= args.max_events:
            break
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cleave events", description=__doc__)
    parser.add_argument("--bootstrap", default=DEFAULT_BOOTSTRAP, help="Kafka bootstrap servers (host:port,...)")
    parser.add_argument("--topic", default=DEFAULT_TOPIC)
    parser.add_argument("--from-beginning", action="store_true", help="print what the topic already holds too")
    parser.add_argument("--request-id", default="", help="only this request's events")
    parser.add_argument("--type", action="append", default=[], help="only events of this type (repeatable)")
    parser.add_argument("--max-events", type=int, default=0, help="stop after this many events (0: no limit)")
    parser.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    return parser


def run_command(command: str, argv: Sequence[str]) -> int:
    """Entry point of ``cleave events``."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
