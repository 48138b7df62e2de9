"""The ``cedana-ray`` command line (see :mod:`.main`)."""
