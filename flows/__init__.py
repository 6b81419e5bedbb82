"""Prefect flows that sequence the botaclip tasks, and the `botaclip` command line."""
