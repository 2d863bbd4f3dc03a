"""The Python client and the `sglora` CLI against a running server (uvicorn on the tiny store): generate, download
by id (a progress bar for a large one), retrieve (multipart with progress), experts, the server's error message,
the URL tried and a hint on failure; `--help` of every command shows every option with its help, env var or
default. The CLI runs in a process where torch, numpy, FastAPI and the app cannot be imported: the client needs
an HTTP library and its CLI framework only."""

from __future__ import annotations

import hashlib
import json
import re
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


def sglora(url: str | None, *args: str, cwd=None) -> subprocess.CompletedProcess:
    server = ["--server", url] if url else []
    return subprocess.run([sys.executable, "-c", _ONLY_HTTP, *server, *args], cwd=cwd or ROOT,
                          env={"PYTHONPATH": str(CLIENT_DIR), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=120)


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
    assert len(rows) == k and all(len(r.split()) >= 4 for r in rows)
    whys = lines[at + 2 + k : at + 2 + 2 * k]  # then why each expert was chosen
    assert [w.split(":")[0] for w in whys] == [f"why {r.split()[0]}" for r in rows], out
    # Both numbers are printed rounded (coverage to 4 decimals, a why's cosine to 3): compare within their roundings,
    # or a best cosine of 0.98870 (printed 0.9887 and 0.989) fails it.
    coverage_text = re.search(r"coverage (\d\.\d+)", out).group(1)
    half_unit = lambda text: 0.5 * 10 ** -len(text.split(".")[1])  # noqa: E731
    cosines = re.findall(r"cosine (\d\.\d+)", "\n".join(whys))
    assert cosines and all(float(c) - half_unit(c) <= float(coverage_text) + half_unit(coverage_text) for c in cosines)

    done = sglora(url, "download", adapter_id, "--format", "peft", "-o", "a.zip", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(tmp_path / "a.zip") as zf:
        assert "adapter_config.json" in zf.namelist()
    done = sglora(url, "download", adapter_id, "-o", "b.safetensors", cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "b.safetensors").read_bytes() == data
    assert "downloading" not in done.stderr  # a small file: no bar
    done = sglora(url, "download", adapter_id, "--format", "open_clip-merged", "-o", "m.safetensors", cwd=tmp_path)
    size = (tmp_path / "m.safetensors").stat().st_size
    assert done.returncode == 0 and size > 1_000_000 and f"open_clip-merged, {size} bytes)" in done.stdout
    assert "downloading m.safetensors" in done.stderr and "100%" in done.stderr  # rich's bar, its final state


def test_cli_retrieve_uploads_with_progress_and_prints_rankings(server, tmp_path):
    url, ctx = server
    task, pairs, paths = image_files(ctx, tmp_path)
    texts = [p.caption for p in pairs]
    done = sglora(url, "retrieve", "--description", task.description, *map(str, paths),
                  "--text", texts[0], "--text", texts[1])
    assert done.returncode == 0, done.stderr
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
    assert f"(GET {url}/adapters/{'0' * 64})" in done.stderr  # the request tried

    # A wrong path prefix: the URL tried and how to fix it, not just "Not Found".
    done = sglora(url + "/api/v1", "generate", "a photo of a red circle")
    assert done.returncode == 1 and f"HTTP 404: Not Found (POST {url}/api/v1/generate-lora)" in done.stderr
    assert "hint: no sglora route at that URL" in done.stderr and f"{url}/api/v1/health/ready" in done.stderr
    done = sglora("http://127.0.0.1:9", "experts")  # nothing listens on port 9
    assert done.returncode == 1 and "cannot reach http://127.0.0.1:9/experts" in done.stderr
    assert "hint: is the server running" in done.stderr and "$SGLORA_URL" in done.stderr


def test_cli_help_shows_every_option_with_its_help_and_env_var_or_default():
    """Must show: `sglora --help` and each subcommand's --help: every option, its help text, its env var/default."""
    import typer
    from sglora_client.cli import app

    root = typer.main.get_command(app)
    commands = {"": root} | {name: root.commands[name] for name in sorted(root.commands)}
    assert set(commands) == {"", "generate", "download", "retrieve", "experts"}
    for name, command in commands.items():
        done = sglora(None, *([name] if name else []), "--help")
        assert done.returncode == 0, done.stderr
        flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", done.stdout).split())  # rich's panels, wrapping undone
        flat = flat[flat.index(" Options "):]  # the option panels, not a docstring that names an option
        options = [p for p in command.params if p.param_type_name == "option" and p.name != "help"]
        assert options, name
        starts = [re.search(rf"(?<![\w-]){re.escape(p.opts[0])}(?![\w-])", flat) for p in options]
        assert all(starts), (name, [p.opts[0] for p, m in zip(options, starts, strict=True) if not m])
        positions = sorted(m.start() for m in starts) + [len(flat)]  # rich may group options in other panels
        for param, start in zip(options, starts, strict=True):
            block = flat[start.start() : positions[positions.index(start.start()) + 1]]
            assert param.help and " ".join(param.help.split()) in block, (name, param.opts, block)
            envvar = f"[env var: {param.envvar}]" if param.envvar else None
            assert (envvar and envvar in block) or "[default: " in block, (name, param.opts, block)
    strategies = commands["generate"].params
    help_text = next(p.help for p in strategies if p.name == "strategy")
    from sglora_client import STRATEGIES as CLIENT_STRATEGIES

    from app.ml.strategies import STRATEGIES

    assert set(CLIENT_STRATEGIES) == set(STRATEGIES) and all(s in help_text for s in STRATEGIES)


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


def test_cli_generate_and_retrieve_with_examples_say_what_they_did(server, tmp_path):
    url, ctx = server
    task = ctx.split.unseen[0]
    args = []
    for i, p in enumerate(task.pairs[:4]):  # training pairs of the task
        path = tmp_path / f"e{i}.png"
        p.image.save(path)
        args += ["--example", f"{path}={p.caption}"]
    done = sglora(url, "generate", task.description, "-o", "a.safetensors", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "examples    4: " in done.stdout and (tmp_path / "a.safetensors").is_file()
    _, pairs, paths = image_files(ctx, tmp_path)
    texts = [x for p in pairs for x in ("--text", p.caption)]
    done = sglora(url, "retrieve", *map(str, paths), *texts, "--description", task.description, *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "examples    4: " in done.stdout
    bad = sglora(url, "generate", task.description, "--example", "missing.png=a caption", cwd=tmp_path)
    assert bad.returncode != 0 and "--example" in bad.stderr and "missing.png" in bad.stderr
