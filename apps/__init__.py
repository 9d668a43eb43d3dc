"""The apps: `qrb ask`, `qrb chat` and `qrb serve` on a trained adapter or an exported model (not DVC stages)."""
