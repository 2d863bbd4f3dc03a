"""sglora client: `SGLoRAClient` (Python, needs httpx only) and the `sglora` command line (cli.py, typer)."""

from sglora_client.client import FORMATS, STRATEGIES, SGLoRAClient, SGLoRAError

__all__ = ["FORMATS", "STRATEGIES", "SGLoRAClient", "SGLoRAError"]
