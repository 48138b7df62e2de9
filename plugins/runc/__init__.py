"""The ``runc`` plugin: OCI containers run, checkpointed and restored through runc."""
