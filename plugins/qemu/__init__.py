"""The ``qemu`` plugin: virtual machines under QEMU, checkpointed through QEMU's migration.

From Python, ``cedana_ray.submit("qemu", vm_request(kernel, initrd=..., memory="512M"))``
(``vm_request`` from :mod:`cedana_ray.plugins.qemu.plugin`) starts a VM job as ``run qemu`` does.
"""
