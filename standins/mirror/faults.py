"""The mirror's bad cases: each `Fault` ties one kind of failure (`FAULT_KINDS`) to one path."""

from __future__ import annotations

import dataclasses

# Bad cases. Each is tied to one path; `paper` faults break a real snapshot paper's page (and the crawl must still
# get it), the others are extra listing entries that must become error records.
FAULT_KINDS = {
    "not_found": "listed paper URL answers 404",
    "error_once": "a real paper answers 500 once, then 200 (a retry gets it)",
    "slow": "a real paper answers after `delay_s` seconds (default 1.0)",
    "malformed": "listed paper page whose HTML is broken beyond recovery (no title, no abstract)",
    "no_abstract": "listed paper page with every block but the Abstract",
    "offsite_redirect": "listed paper URL that redirects (302) to another host (localhost vs 127.0.0.1)",
    "disallowed": "listed paper URL under a path robots.txt disallows",
}


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    path: str | None = None  # None: the mirror picks (a real paper for error_once/slow, a synthetic path otherwise)
    delay_s: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"mirror: unknown fault kind {self.kind!r}; known: {', '.join(FAULT_KINDS)}")


DEFAULT_FAULTS: tuple[Fault, ...] = tuple(Fault(k) for k in FAULT_KINDS)

# Synthetic paper ids of the extra (bad) listing entries: inside the card's 2024 H2 window, page numbers no real
# paper has.
SYNTHETIC = {
    "not_found": "q-2024-09-30-9001",
    "malformed": "q-2024-10-30-9002",
    "no_abstract": "q-2024-11-29-9003",
    "offsite_redirect": "q-2024-12-30-9004",
    "disallowed": "q-2024-08-30-9005",
}
