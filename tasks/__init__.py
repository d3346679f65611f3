"""Prefect tasks of the toka runtime."""
