"""A small synchronous client of the sglora HTTP API (httpx only: no torch, no numpy).

    from sglora_client import SGLoRAClient
    with SGLoRAClient("http://127.0.0.1:8000") as c:
        info = c.generate("a photo of a green star")             # JSON: adapter_id, trace, coverage, downloads
        c.download(info["adapter_id"], "adapter.safetensors")    # or format="peft" / "open_clip-merged"
        result = c.retrieve(["a.png", "b.png"], ["a small green star", "a large green star"],
                            description="a photo of a green star")
        c.experts(q="star")

Every non-2xx answer raises SGLoRAError carrying the server's own message and the field it names.
"""

from __future__ import annotations

import base64
import mimetypes
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

FORMATS = ("safetensors", "peft", "open_clip-merged")
# The server's strategies (its OpenAPI enum; tests/test_client.py checks they agree), for help texts only: the
# server validates the name, so a newer server's strategy works from an older client.
STRATEGIES = ("transfer_routed", "delta_merge", "topk_weighted", "sglora", "sglora_mean", "adapter_soup",
              "model_soup", "zero_shot")
Progress = Callable[[int, int], None]  # (bytes sent or received, total bytes)
_CHUNK = 64 * 1024


class SGLoRAError(Exception):
    """The server said no: status, the field it names (or None), its message, and the request that was tried."""

    def __init__(self, status: int, message: str, field: str | None = None, code: str | None = None,
                 method: str | None = None, url: str | None = None):
        self.status, self.message, self.field, self.code = status, message, field, code
        self.method, self.url = method, url
        where = f" [{field}]" if field else ""
        tried = f" ({method} {url})" if url else ""
        super().__init__(f"HTTP {status}{where}: {message}{tried}")


def error_from(response: httpx.Response) -> SGLoRAError:
    """The server's error envelope {"error": {"message", "field", ...}}; FastAPI's {"detail": ...} or plain text
    from anything in front of it (a proxy) are read too, so the user always sees what was said."""
    tried = {"method": response.request.method, "url": str(response.request.url)}
    try:
        body = response.json()
    except ValueError:
        return SGLoRAError(response.status_code, response.text.strip()[:500] or response.reason_phrase, **tried)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return SGLoRAError(response.status_code, str(err.get("message", err)), err.get("field"), err.get("code"),
                           **tried)
    if isinstance(body, dict) and "detail" in body:
        return SGLoRAError(response.status_code, str(body["detail"]), **tried)
    return SGLoRAError(response.status_code, str(body)[:500], **tried)


class SGLoRAClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 120.0,
                 transport: httpx.BaseTransport | None = None):
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                  transport=transport)

    def __enter__(self) -> SGLoRAClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, request: httpx.Request) -> httpx.Response:
        response = self._http.send(request)
        if response.status_code >= 400:
            raise error_from(response)
        return response

    # ----------------------------------------------------------------------------------------- adapters

    def generate(self, description: str, *, strategy: str | None = None, k: int | None = None,
                 tau: float | None = None, seed: int = 0, num_samples: int = 1, gate: bool = True,
                 examples: Sequence[tuple[str | os.PathLike | bytes, str]] | None = None) -> dict[str, Any]:
        """POST /generate-lora as JSON: adapter_id(s), trace, coverage, metadata, downloads (URL per format).
        A gated answer (`gated` set, `served` zero_shot) is the zero adapter; gate=False asks for the routed one.
        `examples`: (image path or bytes, caption) pairs of the task; the adapter is refined on them and the answer's
        `refinement` says what they did (loss before/after, steps, time, stopped_early)."""
        body = {"description": description, "strategy": strategy, "k": k, "tau": tau, "seed": seed,
                "num_samples": num_samples, "gate": None if gate else False}
        body = {key: v for key, v in body.items() if v is not None}
        if examples:
            body["examples"] = [{"image": base64.b64encode(_file_part(i, image)[1]).decode(), "caption": caption}
                                for i, (image, caption) in enumerate(examples)]
        request = self._http.build_request("POST", "/generate-lora", json=body,
                                           headers={"Accept": "application/json"})
        return self._send(request).json()

    def download(self, adapter_id: str, path: str | os.PathLike | None = None, format: str = "safetensors",
                 progress: Progress | None = None) -> bytes:
        """GET /adapters/{id}?format=...; the bytes, also written to `path` when given. `progress(received,
        total)` per chunk (total: the Content-Length, 0 when the server does not send one)."""
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        params = {} if format == "safetensors" else {"format": format}
        request = self._http.build_request("GET", f"/adapters/{adapter_id}", params=params)
        response = self._http.send(request, stream=True)
        try:
            if response.status_code >= 400:
                response.read()
                raise error_from(response)
            total, received, chunks = int(response.headers.get("content-length") or 0), 0, []
            for chunk in response.iter_bytes(_CHUNK):
                chunks.append(chunk)
                received += len(chunk)
                if progress is not None:
                    progress(received, total)
        finally:
            response.close()
        data = b"".join(chunks)
        if path is not None:
            Path(path).write_bytes(data)
        return data

    # ---------------------------------------------------------------------------------------- retrieval

    def retrieve(self, images: Sequence[str | os.PathLike | bytes], texts: Sequence[str], *,
                 description: str | None = None, adapter_id: str | None = None, top_k: int | None = None,
                 strategy: str | None = None, k: int | None = None, tau: float | None = None, seed: int | None = None,
                 gate: bool = True, progress: Progress | None = None,
                 examples: Sequence[tuple[str | os.PathLike | bytes, str]] | None = None) -> dict[str, Any]:
        """POST /retrieve as a multipart upload of image files (paths or bytes); `progress(sent, total)` per chunk.
        `examples` (with `description`): (image, caption) pairs the description's adapter is refined on."""
        files = [("images", _file_part(i, img)) for i, img in enumerate(images)]
        files += [("example_images", _file_part(i, img)) for i, (img, _) in enumerate(examples or ())]
        fields = {"description": description, "adapter_id": adapter_id, "top_k": top_k, "strategy": strategy,
                  "k": k, "tau": tau, "seed": seed, "gate": None if gate else "false"}
        data: dict[str, Any] = {key: str(v) for key, v in fields.items() if v is not None}
        data["texts"] = list(texts)
        if examples:
            data["example_captions"] = [caption for _, caption in examples]
        request = self._http.build_request("POST", "/retrieve", files=files, data=data)
        if progress is not None:
            request = self._with_progress(request, progress)
        return self._send(request).json()

    def _with_progress(self, request: httpx.Request, progress: Progress) -> httpx.Request:
        # httpx has no upload progress hook: the multipart body it built is re-sent in chunks through a generator,
        # reporting each one (the body is bounded by the server's limit, 32 MiB by default, so it fits in memory).
        body = request.read()
        total = len(body)

        def chunks() -> Iterator[bytes]:
            sent = 0
            for start in range(0, total, _CHUNK):
                piece = body[start : start + _CHUNK]
                sent += len(piece)
                yield piece
                progress(sent, total)

        headers = {"Content-Type": request.headers["Content-Type"], "Content-Length": str(total)}
        return self._http.build_request("POST", request.url, content=chunks(), headers=headers)

    # ------------------------------------------------------------------------------------------ library

    def experts(self, q: str | None = None, **params: Any) -> dict[str, Any]:
        """GET /experts (q: a search query; other params, e.g. limit/offset, are passed through)."""
        query = {key: v for key, v in ({"q": q} | params).items() if v is not None}
        return self._send(self._http.build_request("GET", "/experts", params=query)).json()

    def health(self) -> dict[str, Any]:
        return self._http.get("/health/ready").json()


def _file_part(index: int, image: str | os.PathLike | bytes) -> tuple[str, Any, str]:
    if isinstance(image, bytes):
        return (f"image{index}", image, "application/octet-stream")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return (path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream")
