"""``python -m monitor.sources.nvml_worker``: the worker process the daemon runs."""

from monitor.sources.nvml_worker.main import main

main()
