"""The ``process`` plugin: any Linux process tree, checkpointed with CRIU.

Its hooks are in :mod:`.plugin`; :mod:`.supervisor` is the standard-library-only
parent that each workload runs under.
"""
