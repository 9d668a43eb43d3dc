"""quantum-research-bot: the library the stages import, and the `qrb` command line (qrb/cli.py)."""

__version__ = "0.1.0"
