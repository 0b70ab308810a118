"""The prefill worker: runs prompts, reuses and writes KV blocks through the KV store,
returns the first token (see docs/prefill-decode.md)."""
