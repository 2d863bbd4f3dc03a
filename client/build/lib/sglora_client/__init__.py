"""sglora client: `SGLoRAClient` (Python) and the `sglora` command line (cli.py). Needs httpx only."""

from sglora_client.client import FORMATS, SGLoRAClient, SGLoRAError

__all__ = ["FORMATS", "SGLoRAClient", "SGLoRAError"]
