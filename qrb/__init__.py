"""quantum-research-bot: shared helpers, offline stand-ins and the `qrb` command line."""

__version__ = "0.1.0"
