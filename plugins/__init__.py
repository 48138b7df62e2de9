"""Built-in plugins of cedana-ray, registered through the ``cedana_ray.plugins``
entry point group like any third-party plugin."""
