"""The ``crio`` plugin: containers of any CRI runtime, C/R'd through the CRI API."""
