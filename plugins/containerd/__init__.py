"""The ``containerd`` plugin: containers of a containerd namespace, C/R'd through ``ctr``."""
