"""Species distribution models: the models, the field's metrics, and NCEAS-style benchmarks."""
