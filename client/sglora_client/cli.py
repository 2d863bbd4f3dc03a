"""`sglora`: the command line of the client.

    sglora generate "a photo of a green star" -o adapter.safetensors [--format peft] [--strategy ... --k 4 --seed 0]
    sglora download <adapter_id> -o adapter.peft.zip --format peft
    sglora retrieve --description "a photo of a green star" a.png b.png --text "a small star" --text "a big star"
    sglora experts [--q star]

Server: --server or $SGLORA_URL (default http://127.0.0.1:8000); API key: --api-key or $SGLORA_API_KEY.
Errors print the server's message (and the field it names) on stderr and exit 1. argparse rather than a CLI
framework keeps the client's only dependency httpx.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import httpx

from sglora_client.client import FORMATS, SGLoRAClient, SGLoRAError

_EXT = {"safetensors": ".safetensors", "peft": ".peft.zip", "open_clip-merged": ".open_clip-merged.safetensors"}


# ----------------------------------------------------------------------------------------------- tables


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))[:60]
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table; numbers right-aligned, text left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = zip(values, widths, numeric, strict=True)
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def trace_table(trace: dict[str, Any]) -> str:
    """The routing trace: one row per expert; every per-expert list in the trace becomes a column, so fields
    the server adds later (e.g. predicted gains) show up without a client change. Scalars follow the table."""
    n = len(trace.get("expert_ids") or [])
    columns = [key for key, v in trace.items() if isinstance(v, list) and len(v) == n and n > 0]
    rows = [[trace[c][i] for c in columns] for i in range(n)]
    scalars = [f"{key}: {_cell(v)}" for key, v in trace.items() if key not in columns]
    return "\n".join([table(columns, rows), *scalars]) if columns else "\n".join(scalars)


# --------------------------------------------------------------------------------------------- commands


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _progress(label: str):
    def report(sent: int, total: int) -> None:
        pct = 100 * sent // max(total, 1)
        sys.stderr.write(f"\r{label}: {pct:3d}% ({_size(sent)} / {_size(total)})")
        if sent >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report


def cmd_generate(client: SGLoRAClient, args: argparse.Namespace) -> None:
    info = client.generate(args.description, strategy=args.strategy, k=args.k, tau=args.tau, seed=args.seed,
                           num_samples=args.num_samples)
    adapter_id = info["adapter_id"]
    if info.get("downloadable") is False:  # the server says it could not store the file for download
        raise SGLoRAError(200, f"adapter {adapter_id} was generated but the server could not store it for "
                               "download; try again")
    out = args.output or f"{adapter_id[:12]}{_EXT[args.format]}"
    data = client.download(adapter_id, out, format=args.format)
    coverage = info.get("coverage") or {}
    print(f"adapter_id  {adapter_id}")
    print(f"strategy    {info.get('strategy')}   cache {info.get('cache')}   "
          f"coverage {_cell(coverage.get('max_similarity'))}")
    if coverage.get("warning"):
        print(f"warning     {coverage['warning']}")
    if info.get("trace"):
        print(trace_table(info["trace"]))
    print(f"saved {out} ({args.format}, {len(data)} bytes)")


def cmd_download(client: SGLoRAClient, args: argparse.Namespace) -> None:
    out = args.output or f"{args.adapter_id[:12]}{_EXT[args.format]}"
    data = client.download(args.adapter_id, out, format=args.format)
    print(f"saved {out} ({args.format}, {len(data)} bytes)")


def cmd_retrieve(client: SGLoRAClient, args: argparse.Namespace) -> None:
    result = client.retrieve(args.images, args.text, description=args.description, adapter_id=args.adapter_id,
                             top_k=args.top_k, strategy=args.strategy, seed=args.seed,
                             progress=_progress(f"uploading {len(args.images)} images"))
    used = result.get("adapter") or {}
    print(f"adapter: {used.get('source')} {used.get('adapter_id') or ''}".rstrip())
    names = [os.path.basename(str(p)) for p in args.images]
    rows = [[names[r["index"]], rank + 1, args.text[t["index"]], t["score"]]
            for r in result["images"] for rank, t in enumerate(r["texts"])]
    print("\nimage -> texts")
    print(table(["image", "rank", "text", "score"], rows))
    rows = [[args.text[r["index"]], rank + 1, names[i["index"]], i["score"]]
            for r in result["texts"] for rank, i in enumerate(r["images"])]
    print("\ntext -> images")
    print(table(["text", "rank", "image", "score"], rows))


def cmd_experts(client: SGLoRAClient, args: argparse.Namespace) -> None:
    result = client.experts(q=args.q, limit=args.limit, offset=args.offset)
    experts = result.get("experts", [])
    # id and description, then any other plain field the server sends (e.g. a search's similarity).
    extra = [k for e in experts for k, v in e.items() if k not in ("id", "description")
             and isinstance(v, (int, float, str))]
    headers = ["id", "description", *dict.fromkeys(extra)]
    print(table(headers, [[e.get(h, "") for h in headers] for e in experts]))
    start = result.get("offset", 0)
    print(f"{len(experts)} shown (from {start}) of {result.get('count', len(experts))}; "
          f"store {result.get('store_version')}")


# ------------------------------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sglora", description="Client of the sglora service.")
    p.add_argument("--server", default=os.environ.get("SGLORA_URL", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", default=os.environ.get("SGLORA_API_KEY"))
    p.add_argument("--timeout", type=float, default=120.0)
    sub = p.add_subparsers(dest="command", required=True)

    def generation(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--strategy")
        sp.add_argument("--seed", type=int)

    g = sub.add_parser("generate", help="generate an adapter from a task description and save it")
    g.add_argument("description")
    g.add_argument("-o", "--output", help="file to write (default: <id>.<format ext>)")
    g.add_argument("--format", choices=FORMATS, default="safetensors")
    g.add_argument("--k", type=int)
    g.add_argument("--tau", type=float)
    g.add_argument("--num-samples", type=int, default=1)
    generation(g)
    g.set_defaults(run=cmd_generate)

    d = sub.add_parser("download", help="download a generated adapter by id")
    d.add_argument("adapter_id")
    d.add_argument("-o", "--output")
    d.add_argument("--format", choices=FORMATS, default="safetensors")
    d.set_defaults(run=cmd_download)

    r = sub.add_parser("retrieve", help="rank texts per image and images per text")
    r.add_argument("images", nargs="+", help="image files")
    r.add_argument("--text", action="append", required=True, help="a candidate caption (repeat)")
    r.add_argument("--description", help="generate an adapter for this task")
    r.add_argument("--adapter-id", help="use a generated adapter")
    r.add_argument("--top-k", type=int)
    generation(r)
    r.set_defaults(run=cmd_retrieve)

    e = sub.add_parser("experts", help="list (or search) the expert library")
    e.add_argument("--q", help="search query")
    e.add_argument("--limit", type=int)
    e.add_argument("--offset", type=int)
    e.set_defaults(run=cmd_experts)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "generate" and args.seed is None:
        args.seed = 0
    try:
        with SGLoRAClient(args.server, api_key=args.api_key, timeout=args.timeout) as client:
            args.run(client, args)
    except SGLoRAError as e:
        print(f"sglora: error: {e}", file=sys.stderr)
        return 1
    except httpx.TransportError as e:
        print(f"sglora: error: cannot reach {args.server}: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, httpx.HTTPError) as e:  # unreadable image, unwritable output
        print(f"sglora: error: {e}", file=sys.stderr)
        return 1
    return 0
