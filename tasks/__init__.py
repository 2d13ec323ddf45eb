"""Prefect tasks of lockgate, one module per stage, plus the shared pieces they stand on."""
