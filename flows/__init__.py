"""Prefect flows: they wire DVC stages together; logic lives in stages/.

Importing any flow sets the environment its Prefect servers and child processes start with (flows/workspace.py's
`venv_env` passes the same to every command): Prefect's server sends anonymous usage data at each start, which
offline logs "Failed to send telemetry" as an error, and nothing of this project calls out unasked. A value the user
set is kept.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the temporary server of a run without PREFECT_API_URL: Prefect waits 20 s for it, which a busy 2-core machine
# misses (seen: the tiny demo failed at 22 s); its start is cheap, the wait only bounds a real failure
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
