"""The ``gpu`` plugin: NVIDIA GPUs through NVML and the CUDA driver checkpoint API.

- :mod:`.nvml`: discovery, health and per-process GPU use;
- :mod:`.cuda`: ``cuCheckpointProcess*`` through ctypes on ``libcuda.so.1``;
- :mod:`.intercept`: dump/restore middleware that makes CUDA jobs checkpointable;
- :mod:`.tracing`: a per-job GPU activity trace (Chrome/Perfetto JSON).
"""
