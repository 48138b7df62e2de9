"""The ``qemu`` plugin: virtual machines under QEMU, checkpointed through QEMU's migration."""
