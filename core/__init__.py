"""Contracts shared by the orchestrator (`ablate`), the trainer and `eval`: torch-free, importing none of them.

- `core.atomic`: the one way to write a file another process may read (temp file, fsync, rename).
- `core.rundir`: the run directory — its layout, the arm states and who writes them, writers and readers.
- `core.weights`: pretrained weights — what a component needs, whether it is here, how to fetch it.
"""
