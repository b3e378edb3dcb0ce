"""The OpenAI-compatible server and its monitoring.

Monitoring: `metrics` (Prometheus `/metrics`), `reqlog` (JSONL request log, no text unless
enabled), `drift` (prompt drift against a reference set); docs/serving_monitoring.md.
"""
