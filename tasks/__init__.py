"""Prefect tasks: thin wrappers, one botaclip_core call each, returning small records."""
