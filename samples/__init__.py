"""Sample model builders and exporters used by tests and benchmarks."""
