"""Input and output: where things live (local paths and URIs), the on-disk format and its manifest,
atomic directory writes, and experiment tracking."""
