"""Offline stand-ins for what the real recipe reaches over the network (above the stages: no stage imports them): the
journal mirror, the smoke-test OpenAI-compatible endpoint, the base-model builders, and the helper that runs them as
background services."""
