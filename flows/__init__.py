"""Prefect flows of the toka runtime: compiled agents and the pipeline entrypoint."""
