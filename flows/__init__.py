"""Prefect flows: they wire DVC stages together; logic lives in stages/ (docs/orchestration.md)."""

import os

# for the servers and child processes the flows start (a value the user set is kept): offline, Prefect's telemetry
# logs an error at each start, and its temporary server's 20 s start-up wait is missed on a busy 2-core machine
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
