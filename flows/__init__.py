"""Prefect flows, the spec schema and the ``lockgate`` CLI."""
