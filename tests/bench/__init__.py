"""Benchmarks for hotplug-monitor: ``python -m tests.bench [--quick] [--json OUT]``.

Kept out of the default test run: no module here is named ``test_*.py``.
"""
