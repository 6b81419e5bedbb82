"""The pipeline's stages, one module each, and the registry that orders them into a DAG."""
