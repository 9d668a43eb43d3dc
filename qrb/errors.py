"""The project's one error path: library code raises these (or `ValueError`); a stage's `main()` turns them into one
line and an exit code, once (`qrb.stage.run_stage`). The exit code tells an orchestrator what a retry can do.

    ConfigError     params, credentials, hardware, a missing upstream output: no retry can fix it (exit 78)
    DataError       the inputs fail a check (the validate gate, a crawl that kept no paper)  (exit 65)
    TransientError  the network or an endpoint failed where a later try may pass              (exit 75)
    QrbError        anything else the project reports in one line                             (exit 1)
"""

from __future__ import annotations

# sysexits.h values, so shell tools and Prefect's retry policy read them the same way
EXIT_FAILED = 1
EXIT_USAGE = 2        # argparse's own
EXIT_DATA = 65        # EX_DATAERR
EXIT_TRANSIENT = 75   # EX_TEMPFAIL
EXIT_CONFIG = 78      # EX_CONFIG


class QrbError(Exception):
    """A failure the project explains in one line (no traceback)."""

    exit_code = EXIT_FAILED
    kind = "failed"


class ConfigError(QrbError):
    exit_code = EXIT_CONFIG
    kind = "config"


class DataError(QrbError):
    exit_code = EXIT_DATA
    kind = "data"


class TransientError(QrbError):
    exit_code = EXIT_TRANSIENT
    kind = "transient"


def kind_of_exit(code: int) -> str:
    """The failure kind an exit code stands for (what a flow shows and decides retries by)."""
    return {EXIT_CONFIG: "config", EXIT_DATA: "data", EXIT_TRANSIENT: "transient", EXIT_USAGE: "usage"}.get(
        code, "failed")
