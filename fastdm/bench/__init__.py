"""Benchmark harness (`fastdm-bench`): presets with exact architectures, naive vs fast steps."""
