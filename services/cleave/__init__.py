"""Cleave: disaggregated LLM serving (prefill, decode, KV store, MoE experts, router)."""

__version__ = "0.1.0"
