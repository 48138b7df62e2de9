"""Ray actors of cedana-ray (NodeAgent, Coordinator). They come with the Ray control plane."""
