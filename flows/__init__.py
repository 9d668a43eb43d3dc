"""Prefect flows: they wire DVC stages together; logic lives in stages/."""
