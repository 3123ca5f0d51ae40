"""Benchmarks: code that writes JSON rows and Markdown reports, never timed assertions."""
