"""The NVML worker: NVIDIA's library in a process of its own, translated into events.

The daemon runs ``python -m monitor.sources.nvml_worker`` (``monitor.sources.nvml``), so that a
crash inside ``libnvidia-ml.so.1`` ends this process and not the daemon. What passes between the
two, and how it is written, is ``pipe``. One task per GPU (``tasks``) finds it in NVML by its PCI
address, reads its facts (``attributes``), registers an event set of its own for XIDs and the
other health events the GPU supports, and waits on it (``events``); its statistics are read only
when the daemon asks (``gpu_stats``). ``main`` starts NVML and serves the pipe; ``library``
holds what the others share of pynvml's errors.

Nothing is imported here: the daemon imports ``pipe`` alone, and never loads pynvml.
"""
