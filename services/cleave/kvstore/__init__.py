"""The KV-cache store service: content-addressed KV blocks in tiers behind gRPC, with
an index in Redis of which store holds which block. See docs/kvstore.md."""
