"""The Python client and the `sglora` CLI against a running server (uvicorn on the tiny store): generate, download
by id, retrieve (multipart with progress), experts, and the server's error message on failure. The CLI runs in a
process where torch, numpy, FastAPI and the app cannot be imported: the client needs an HTTP library only."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile

import pytest

from tests.live_server import ROOT, live_server

CLIENT_DIR = ROOT / "client"
sys.path.insert(0, str(CLIENT_DIR))

_ONLY_HTTP = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "numpy", "fastapi", "open_clip", "app", "PIL", "safetensors"}:
            raise ImportError(f"the client must not need {name}")
sys.meta_path.insert(0, Block())
sys.argv = ["sglora", *sys.argv[1:]]
runpy.run_module("sglora_client", run_name="__main__")
"""


@pytest.fixture(scope="module")
def server(tiny_build):
    with live_server(tiny_build.out) as url:
        yield url, tiny_build


def sglora(url: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _ONLY_HTTP, "--server", url, *args], cwd=cwd or ROOT,
                          env={"PYTHONPATH": str(CLIENT_DIR), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=120)


def image_files(ctx, tmp_path, n=2):
    task = ctx.split.unseen[0]
    pairs = ctx.split.test_pairs[task.name][:n]
    paths = []
    for i, p in enumerate(pairs):
        path = tmp_path / f"img{i}.png"
        p.image.save(path)
        paths.append(path)
    return task, pairs, paths


def test_cli_generate_then_download_by_id(server, tmp_path):
    url, ctx = server
    task = ctx.split.unseen[0]
    done = sglora(url, "generate", task.description, "-o", "a.safetensors", "--seed", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = (tmp_path / "a.safetensors").read_bytes()
    adapter_id = hashlib.sha256(data).hexdigest()
    out = done.stdout
    assert f"adapter_id  {adapter_id}" in out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("expert_ids"))
    assert "similarities" in lines[at] and "weights" in lines[at]  # the routing trace as a table, one row per expert
    k = int(json.loads((ctx.out / "manifest.json").read_text())["artifacts"]["routing"]["record"]["strategy_params"][
        json.loads((ctx.out / "manifest.json").read_text())["artifacts"]["routing"]["record"]["default_strategy"]]["k"])
    rows = lines[at + 2 : at + 2 + k]  # K: what the store's validation chose for its default strategy
    assert len(rows) == k and all(len(r.split()) >= 4 for r in rows) and lines[at + 2 + k].startswith("max_similarity")

    done = sglora(url, "download", adapter_id, "--format", "peft", "-o", "a.zip", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(tmp_path / "a.zip") as zf:
        assert "adapter_config.json" in zf.namelist()
    done = sglora(url, "download", adapter_id, "-o", "b.safetensors", cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "b.safetensors").read_bytes() == data


def test_cli_retrieve_uploads_with_progress_and_prints_rankings(server, tmp_path):
    url, ctx = server
    task, pairs, paths = image_files(ctx, tmp_path)
    texts = [p.caption for p in pairs]
    done = sglora(url, "retrieve", "--description", task.description, *map(str, paths),
                  "--text", texts[0], "--text", texts[1])
    assert done.returncode == 0, done.stderr
    assert "uploading 2 images: 100%" in done.stderr
    assert "adapter: description" in done.stdout
    assert "image -> texts" in done.stdout and "text -> images" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("img")]
    assert len(rows) == 4  # 2 images x 2 ranked texts
    assert all(texts[0] in done.stdout and texts[1] in done.stdout for _ in rows)


def test_cli_experts_and_server_errors(server):
    url, ctx = server
    done = sglora(url, "experts")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split()[:2] == ["id", "description"]
    manifest = json.loads((ctx.out / "manifest.json").read_text())
    assert all(e["id"] in done.stdout and e["description"] in done.stdout for e in manifest["experts"])

    done = sglora(url, "generate", "a photo of a red circle", "--k", "100000")
    assert done.returncode == 1
    assert "HTTP 422 [k]" in done.stderr and "exceeds the library size" in done.stderr  # the server's own words
    done = sglora(url, "download", "0" * 64)
    assert done.returncode == 1 and "HTTP 404 [adapter_id]" in done.stderr


def test_python_client_reports_progress_and_returns_json(server, tmp_path):
    from sglora_client import SGLoRAClient, SGLoRAError

    url, ctx = server
    task, pairs, paths = image_files(ctx, tmp_path)
    seen: list[tuple[int, int]] = []
    with SGLoRAClient(url) as client:
        info = client.generate(task.description)
        assert set(info["downloads"]) == {"safetensors", "peft", "open_clip-merged"}
        result = client.retrieve(paths, [p.caption for p in pairs], adapter_id=info["adapter_id"],
                                 progress=lambda sent, total: seen.append((sent, total)))
        assert result["adapter"] == result["adapter"] | {"source": "adapter_id", "adapter_id": info["adapter_id"]}
        assert len(result["images"]) == 2 and len(result["texts"]) == 2
        merged = client.download(info["adapter_id"], format="open_clip-merged")
        assert len(merged) > 1000
        with pytest.raises(SGLoRAError) as err:
            client.retrieve(paths, [])
    assert seen and seen[-1][0] == seen[-1][1] and [s for s, _ in seen] == sorted(s for s, _ in seen)
    assert err.value.status in (400, 422) and err.value.field == "texts"
