"""The ``slurm`` plugin: Ray clusters in SLURM allocations, checkpointed before preemption."""
