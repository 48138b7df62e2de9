"""The k8s plugin: install cedana-ray's node agents on a Kubernetes cluster, list this node's pods,
and checkpoint and restore a pod's containers (``dump k8s``/``restore k8s``)."""
