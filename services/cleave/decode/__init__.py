"""The decode worker: continues prefilled (or interrupted) requests from KV blocks in
the store and streams their tokens (see docs/prefill-decode.md)."""
