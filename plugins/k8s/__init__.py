"""The k8s plugin: install cedana-ray's node agents on a Kubernetes cluster, and list this node's pods."""
