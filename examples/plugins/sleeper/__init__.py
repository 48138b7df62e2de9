"""``sleeper``: an example runtime plugin. Its workload is a plain process tree whose output
is discarded, dumped and restored with the core's CRIU driver. See docs/plugins.md."""
