"""Benchmark scripts that print a table (not tests)."""
