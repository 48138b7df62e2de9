"""Ray actors of cedana-ray: a NodeAgent on every node and the Coordinator on the head."""
