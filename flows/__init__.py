"""Prefect flows: they wire DVC stages together; logic lives in stages/.

Importing any flow sets the environment its Prefect servers and child processes start with (flows/workspace.py's
`venv_env` passes the same to every command): Prefect's server sends anonymous usage data at each start, which
offline logs "Failed to send telemetry" as an error, and nothing of this project calls out unasked. A value the user
set is kept.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
