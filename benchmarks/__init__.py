"""Benchmarks of flash_module; a package so that ``benchmarks.bench`` imports from the repository root."""
