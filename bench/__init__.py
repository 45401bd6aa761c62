"""Benchmarks and figures (not unit tests): each module has a main() that prints what it measured."""
