"""The wire and storage contract of Weft.

Pydantic models of workflow definitions, execution events and broker messages,
subject names, and the safe expression language used inside `${{ }}`.
This package imports nothing else of Weft's; everything else may import it.
"""
