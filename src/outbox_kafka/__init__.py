"""Apache Kafka for outbox: ``open_broker("kafka://127.0.0.1:9092")`` or :func:`connect`.
See :mod:`outbox_kafka.broker` for what Kafka does natively and what the framework
adds, and :mod:`outbox_kafka.mapping` for the record format."""

from .broker import (
    AsyncKafkaPublisher,
    AsyncKafkaSubscriber,
    KafkaBroker,
    KafkaPublisher,
    KafkaSubscriber,
    connect,
    parse_url,
)

__all__ = ["AsyncKafkaPublisher", "AsyncKafkaSubscriber", "KafkaBroker", "KafkaPublisher",
           "KafkaSubscriber", "connect", "parse_url"]
