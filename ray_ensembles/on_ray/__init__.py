"""The Ray layer: the Ray Train shim and its reporting, Ray's private names, the cluster, and
Ray Datasets streamed as training data."""
