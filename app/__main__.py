"""`python -m app [--host H] [--port P]`: serve with a graceful shutdown a load balancer can follow.

Plain `uvicorn app.main:app` closes its listener the moment SIGTERM arrives. Here the first SIGTERM (or Ctrl+C)
only marks the app draining (/health/ready turns 503 at once) and the server keeps serving for
SGLORA_SHUTDOWN_DELAY_S, so the load balancer sees the 503 and stops routing here; then uvicorn's own graceful
shutdown stops accepting and waits up to SGLORA_SHUTDOWN_GRACE_S for in-flight requests. A second signal
during the delay shuts down at once. uvicorn has no hook for the delay, hence the small Server subclass.
"""

from __future__ import annotations

import logging
import time

import typer
import uvicorn

from app.core.config import Settings
from app.core.header_timeout import header_timeout_protocol
from app.core.lifecycle import Lifecycle
from app.main import create_app, load_settings

logger = logging.getLogger("sglora.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, delay_s: float):
        super().__init__(config)
        self.lifecycle, self.delay_s = lifecycle, delay_s

    def handle_exit(self, sig: int, frame) -> None:
        if self.lifecycle.draining:  # a second signal: stop waiting
            super().handle_exit(sig, frame)
            return
        self.lifecycle.start_draining()
        logger.info("signal %s: readiness is 503; serving %.1fs more, then draining", sig, self.delay_s)

    async def on_tick(self, counter: int) -> bool:
        since = self.lifecycle.draining_since
        if since is not None and not self.should_exit and time.monotonic() - since >= self.delay_s:
            self.should_exit = True
        return await super().on_tick(counter)


def server_config(app, settings: Settings, host: str, port: int) -> uvicorn.Config:
    """uvicorn's settings for this app: our access line instead of uvicorn's, the drain's grace period, and a
    bound on how long a client may take to send its headers."""
    return uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                          timeout_graceful_shutdown=settings.shutdown_grace_s,
                          http=header_timeout_protocol(settings.header_timeout_s))


def main(host: str = "127.0.0.1", port: int = 8000) -> None:
    settings = load_settings()
    app = create_app(settings)
    DrainingServer(server_config(app, settings, host, port), app.state.lifecycle, settings.shutdown_delay_s).run()


if __name__ == "__main__":
    typer.run(main)
