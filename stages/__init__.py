"""Pipeline stages, one module each; run from the repository (or workspace) root as `python -m stages.<name>`."""
