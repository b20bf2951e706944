"""Benchmarks that prove accuracy and latency hold after quantization (also run from benchmarks/)."""
