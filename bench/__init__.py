"""Benchmarks: each module starts the real processes it measures, prints a table and writes JSON."""
