"""Compression steps of a candidate's recipe, one module per step kind.

Each module exposes ``apply(current, out, step, context) -> StepOutcome``: it reads the model
folder ``current`` (``save_pretrained`` layout with its tokenizer), writes the result to ``out`` in
the same layout, and reports what it did. ``tasks.compress`` chains the steps of a candidate.
"""
