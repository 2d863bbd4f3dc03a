"""The process's serving phase, shared by the readiness probe and the server runner (`python -m app`).

On SIGTERM the runner marks the process draining: /health/ready answers 503 at once so load balancers stop
sending traffic, while requests that still arrive are served for `shutdown_delay_s`; then uvicorn stops
accepting and waits up to `shutdown_grace_s` for in-flight requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Lifecycle:
    draining_since: float | None = None  # time.monotonic() of the first SIGTERM

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def start_draining(self) -> None:
        if self.draining_since is None:
            self.draining_since = time.monotonic()
