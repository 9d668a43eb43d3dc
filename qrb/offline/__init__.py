"""Offline stand-ins for what the real recipe reaches over the network: the journal mirror, the smoke-test
OpenAI-compatible endpoint, the offline base-model builders, and the helper that runs them as background services."""
