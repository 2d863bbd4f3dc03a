"""`sglora`: the command line of the client (typer; rich for tables' neighbours: progress bars).

    sglora generate "a photo of a green star" -o adapter.safetensors [--format peft] [--strategy ... --k 4 --seed 0]
    sglora download <adapter_id> -o adapter.peft.zip --format peft
    sglora retrieve --description "a photo of a green star" a.png b.png --text "a small star" --text "a big star"
    sglora experts [--q star]

Every option has a help text and shows its environment variable or default in `--help`. Server and key: --server /
$SGLORA_URL, --api-key / $SGLORA_API_KEY (the server's own key variable: one shell can run both). Per-command
options read $SGLORA_CLI_<OPTION> (e.g. $SGLORA_CLI_STRATEGY), never the server's $SGLORA_K / $SGLORA_TAU. Errors
print the server's message, the request tried and a suggested fix on stderr, and exit 1.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from sglora_client.client import FORMATS, STRATEGIES, SGLoRAClient, SGLoRAError

DEFAULT_URL = "http://127.0.0.1:8000"
PROGRESS_FROM_BYTES = 1_000_000  # transfers smaller than this finish before a bar is worth drawing
_EXT = {"safetensors": ".safetensors", "peft": ".peft.zip", "open_clip-merged": ".open_clip-merged.safetensors"}
_STDERR = Console(stderr=True)


def _env(option: str) -> str:
    return f"SGLORA_CLI_{option.upper()}"


app = typer.Typer(name="sglora", add_completion=False, no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Client of the sglora service: a task description in, a CLIP LoRA adapter out; retrieval "
                       "with it; the expert library. Server: --server or $SGLORA_URL.")


@dataclass
class Session:
    server: str
    api_key: str | None
    timeout: float
    quiet: bool

    @contextmanager
    def client(self) -> Iterator[SGLoRAClient]:
        """A client for one command; a refusal or an unreachable server ends the command with exit status 1 and a
        message naming the request tried and what to do."""
        try:
            with SGLoRAClient(self.server, api_key=self.api_key, timeout=self.timeout) as client:
                yield client
        except SGLoRAError as e:
            typer.echo(f"sglora: error: {e}", err=True)
            hint = suggestion(e, self.server)
            if hint:
                typer.echo(f"hint: {hint}", err=True)
            raise typer.Exit(1) from None
        except httpx.TransportError as e:
            typer.echo(f"sglora: error: {_unreachable(e, self.server)}", err=True)
            raise typer.Exit(1) from None
        except (OSError, httpx.HTTPError) as e:  # unwritable output, unreadable image
            typer.echo(f"sglora: error: {e}", err=True)
            raise typer.Exit(1) from None


@app.callback()
def main_options(
    ctx: typer.Context,
    server: Annotated[str, typer.Option("--server", envvar="SGLORA_URL", show_default=True,
                                        help="the sglora API root: the URL that answers /health/ready")] = DEFAULT_URL,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="SGLORA_API_KEY", show_default=False,
                                                help="the server's API key, when it sets SGLORA_API_KEY")] = None,
    timeout: Annotated[float, typer.Option("--timeout", envvar=_env("timeout"), show_default=True,
                                           help="seconds to wait for the server's answer")] = 120.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", envvar=_env("quiet"), show_default=True,
                                        help="no progress bars")] = False,
) -> None:
    ctx.obj = Session(server, api_key, timeout, quiet)


# ------------------------------------------------------------------------------------- shared options
# Generation options shared by `generate` and `retrieve`; a new one (e.g. example images) is one more of these
# plus one key in `GenerationOptions.body`.

StrategyOpt = Annotated[str | None, typer.Option(
    "--strategy", envvar=_env("strategy"), show_default="the server's, chosen by its store's validation",
    help=f"how the adapter is made: {', '.join(STRATEGIES)}")]
KOpt = Annotated[int | None, typer.Option("--k", envvar=_env("k"), min=1, show_default="the store's validated K",
                                          help="experts routed to")]
TauOpt = Annotated[float | None, typer.Option("--tau", envvar=_env("tau"), min=0,
                                              show_default="the store's validated τ",
                                              help="softmax temperature of the routing weights")]
SeedOpt = Annotated[int, typer.Option("--seed", envvar=_env("seed"), min=0, show_default=True,
                                      help="sampling seed (sglora): same seed, same adapter")]
GateOpt = Annotated[bool, typer.Option("--gate/--no-gate", envvar=_env("gate"), show_default=True,
                                       help="let the server's confidence gate serve zero-shot when no expert is "
                                            "predicted to help; --no-gate: the routed adapter anyway")]
ExamplesOpt = Annotated[list[str] | None, typer.Option(
    "--example", "-e", show_default="none: the description alone",
    help="IMAGE=CAPTION: a pair of the task to refine the adapter on (repeat; 4 or more can change it)")]


def parse_examples(values: list[str] | None) -> list[tuple[Path, str]] | None:
    """--example IMAGE=CAPTION -> (path, caption) pairs, the image checked to exist."""
    if not values:
        return None
    pairs = []
    for value in values:
        path, sep, caption = value.partition("=")
        if not sep or not caption.strip():
            raise typer.BadParameter(f"{value!r}: expected IMAGE=CAPTION", param_hint="--example")
        if not Path(path).is_file():
            raise typer.BadParameter(f"image not found: {path}", param_hint="--example")
        pairs.append((Path(path), caption))
    return pairs


def refinement_line(refinement: dict[str, Any] | None) -> str | None:
    """What few-shot examples did to an adapter, in one line (None without examples)."""
    if not refinement:
        return None
    return (f"examples    {refinement['examples']}: {refinement['method']}, {refinement['steps']} steps in "
            f"{refinement['seconds']:.2f} s, loss {_cell(refinement.get('loss_before'))} -> "
            f"{_cell(refinement.get('loss_after'))}; {refinement['stop_reason']}")


# An Enum, so click lists and checks the choices.
ExportFormat = Enum("ExportFormat", {name.replace("-", "_"): name for name in FORMATS}, type=str)
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", show_default="<adapter id>.<format extension>",
                                              help="file to write")]
FormatOpt = Annotated[ExportFormat, typer.Option("--format", envvar=_env("format"), show_default=True,
                                        help="file format: the adapter (open_clip names), a PEFT folder (zip) for "
                                             "Hugging Face CLIPModel, or the base model with the adapter merged")]


@dataclass
class GenerationOptions:
    strategy: str | None
    k: int | None
    tau: float | None
    seed: int
    gate: bool

    def body(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "k": self.k, "tau": self.tau, "seed": self.seed, "gate": self.gate}


# ----------------------------------------------------------------------------------------------- tables


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))[:60]
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table (pipes and greps well); numbers right-aligned, text left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = zip(values, widths, numeric, strict=True)
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def trace_table(trace: dict[str, Any]) -> str:
    """The routing trace: one row per expert; every per-expert list in the trace becomes a column (the reasons,
    long sentences, follow the table instead), so fields the server adds later show up without a client change.
    Scalars follow."""
    n = len(trace.get("expert_ids") or [])
    lists = [key for key, v in trace.items() if isinstance(v, list) and len(v) == n and n > 0]
    columns = [key for key in lists if key != "reasons"]
    rows = [[trace[c][i] for c in columns] for i in range(n)]
    why = [f"why {trace['expert_ids'][i]}: {reason}" for i, reason in enumerate(trace.get("reasons") or [])]
    scalars = [f"{key}: {_cell(v) if key != 'routing' else v}" for key, v in trace.items() if key not in lists]
    return "\n".join([table(columns, rows), *why, *scalars]) if columns else "\n".join(scalars)


# ------------------------------------------------------------------------------------------- progress


@contextmanager
def progress_bar(label: str, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr for a transfer over PROGRESS_FROM_BYTES, as `progress(done, total)`."""
    bar: Progress | None = None
    task = None

    def report(done: int, total: int) -> None:
        nonlocal bar, task
        if quiet or (total or done) < PROGRESS_FROM_BYTES:
            return
        if bar is None:
            bar = Progress("[progress.description]{task.description}", BarColumn(), TaskProgressColumn(),
                           DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=_STDERR)
            bar.start()
            task = bar.add_task(label, total=total or None)
        bar.update(task, completed=done)

    try:
        yield report
    finally:
        if bar is not None:
            bar.stop()


# --------------------------------------------------------------------------------------------- commands


def _save(session: Session, client: SGLoRAClient, adapter_id: str, output: Path | None, fmt: str) -> None:
    fmt = ExportFormat(fmt).value
    out = output or Path(f"{adapter_id[:12]}{_EXT[fmt]}")
    with progress_bar(f"downloading {out.name}", session.quiet) as report:
        data = client.download(adapter_id, out, format=fmt, progress=report)
    typer.echo(f"saved {out} ({fmt}, {len(data)} bytes)")


@app.command()
def generate(
    ctx: typer.Context,
    description: Annotated[str, typer.Argument(help="one line describing the task, e.g. 'a photo of a green star'")],
    output: OutputOpt = None,
    fmt: FormatOpt = ExportFormat("safetensors"),
    strategy: StrategyOpt = None,
    k: KOpt = None,
    tau: TauOpt = None,
    seed: SeedOpt = 0,
    gate: GateOpt = True,
    num_samples: Annotated[int, typer.Option("--num-samples", envvar=_env("num_samples"), min=1, show_default=True,
                                             help="adapters to sample (sglora); the first is saved")] = 1,
    example: ExamplesOpt = None,
) -> None:
    """Generate an adapter from a task description (refined on --example pairs when given), print which experts
    made it and why, and save it."""
    session: Session = ctx.obj
    options = GenerationOptions(strategy, k, tau, seed, gate)
    examples = parse_examples(example)
    with session.client() as client:
        info = client.generate(description, num_samples=num_samples, examples=examples, **options.body())
        print_generation(info)
        if info.get("downloadable") is False:  # the server says it could not store the file for download
            raise SGLoRAError(200, f"adapter {info['adapter_id']} was generated but the server could not store it "
                                   "for download; try again")
        _save(session, client, info["adapter_id"], output, fmt)


def print_generation(info: dict[str, Any]) -> None:
    coverage = info.get("coverage") or {}
    typer.echo(f"adapter_id  {info['adapter_id']}")
    typer.echo(f"strategy    {info.get('strategy')}   served {info.get('served', info.get('strategy'))}   "
               f"cache {info.get('cache')}   coverage {_cell(coverage.get('max_similarity'))}")
    if info.get("gated"):  # the zero adapter: no expert was applied, so no weights to show
        typer.echo(f"gated       zero-shot (no adapter): {info['gated']}")
        typer.echo("            --no-gate asks for the routed adapter anyway")
    elif coverage.get("warning"):
        typer.echo(f"warning     {coverage['warning']}")
    if info.get("trace") and not info.get("gated"):
        typer.echo(trace_table(info["trace"]))
    if line := refinement_line(info.get("refinement")):
        typer.echo(line)


@app.command()
def download(
    ctx: typer.Context,
    adapter_id: Annotated[str, typer.Argument(help="the id a generation printed (sha256 of the adapter file)")],
    output: OutputOpt = None,
    fmt: FormatOpt = ExportFormat("safetensors"),
) -> None:
    """Download a generated adapter by id, in any format (while the server keeps it: SGLORA_CACHE_TTL_S)."""
    session: Session = ctx.obj
    with session.client() as client:
        _save(session, client, adapter_id, output, fmt)


@app.command()
def retrieve(
    ctx: typer.Context,
    images: Annotated[list[Path], typer.Argument(help="image files (PNG, JPEG, WebP)", exists=True, dir_okay=False)],
    text: Annotated[list[str], typer.Option("--text", "-t", show_default="required, repeat for each caption",
                                            help="a candidate caption")],
    description: Annotated[str | None, typer.Option("--description", "-d", show_default="none: zero-shot",
                                                    help="generate an adapter for this task first")] = None,
    adapter_id: Annotated[str | None, typer.Option("--adapter-id", show_default="none",
                                                   help="use a generated adapter instead of a description")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", envvar=_env("top_k"), min=1, show_default="all",
                                              help="ranked items shown per query")] = None,
    strategy: StrategyOpt = None,
    k: KOpt = None,
    tau: TauOpt = None,
    seed: SeedOpt = 0,
    gate: GateOpt = True,
    example: ExamplesOpt = None,
) -> None:
    """Rank the texts for each image and the images for each text, with the adapter of a description (or id)."""
    session: Session = ctx.obj
    options = GenerationOptions(strategy, k, tau, seed, gate)
    examples = parse_examples(example)
    with session.client() as client, progress_bar(f"uploading {len(images)} images", session.quiet) as report:
        result = client.retrieve(images, text, description=description, adapter_id=adapter_id, top_k=top_k,
                                 progress=report, examples=examples, **options.body())
    used = result.get("adapter") or {}
    typer.echo(f"adapter: {used.get('source')} {used.get('adapter_id') or ''}".rstrip())
    if line := refinement_line(used.get("refinement")):
        typer.echo(line)
    if used.get("gated"):
        typer.echo(f"gated: zero-shot ranking: {used['gated']} (--no-gate: the routed adapter anyway)")
    names = [os.path.basename(str(p)) for p in images]
    rows = [[names[r["index"]], rank + 1, text[t["index"]], t["score"]]
            for r in result["images"] for rank, t in enumerate(r["texts"])]
    typer.echo("\nimage -> texts")
    typer.echo(table(["image", "rank", "text", "score"], rows))
    rows = [[text[r["index"]], rank + 1, names[i["index"]], i["score"]]
            for r in result["texts"] for rank, i in enumerate(r["images"])]
    typer.echo("\ntext -> images")
    typer.echo(table(["text", "rank", "image", "score"], rows))


@app.command()
def experts(
    ctx: typer.Context,
    q: Annotated[str | None, typer.Option("--q", show_default="none: list the library",
                                          help="a task description: the nearest experts and their cosine")] = None,
    limit: Annotated[int | None, typer.Option("--limit", envvar=_env("limit"), min=1,
                                              show_default="the server's page size (100)",
                                              help="experts shown")] = None,
    offset: Annotated[int | None, typer.Option("--offset", min=0, show_default="0",
                                               help="first expert shown (listing only)")] = None,
) -> None:
    """List the expert library, or search it for the experts nearest a description (is my task covered?)."""
    session: Session = ctx.obj
    with session.client() as client:
        result = client.experts(q=q, limit=limit, offset=offset)
    listed = result.get("experts", [])
    # id and description, then any other plain field the server sends (e.g. a search's similarity).
    extra = [key for e in listed for key, v in e.items() if key not in ("id", "description")
             and isinstance(v, (int, float, str))]
    headers = ["id", "description", *dict.fromkeys(extra)]
    typer.echo(table(headers, [[e.get(h, "") for h in headers] for e in listed]))
    typer.echo(f"{len(listed)} shown (from {result.get('offset', 0)}) of {result.get('count', len(listed))}; "
               f"store {result.get('store_version')}; default strategy {result.get('default_strategy')}")


# ------------------------------------------------------------------------------------------------- errors


def suggestion(error: SGLoRAError, server: str) -> str | None:
    """What to do about a refusal, when the status says more than the server's message does."""
    if error.status == 404 and error.field is None:
        return (f"no sglora route at that URL: --server / $SGLORA_URL ({server}) must be the API root, the URL "
                f"that answers {server.rstrip('/')}/health/ready (include any path prefix a proxy adds, nothing more)")
    if error.status == 401:
        return "the server requires an API key: pass --api-key or set $SGLORA_API_KEY"
    if error.status == 503:
        return "the server is loading or busy: retry in a few seconds"
    return None


def _unreachable(error: httpx.TransportError, server: str) -> str:
    try:
        url = error.request.url
    except RuntimeError:  # httpx raises when the error carries no request
        url = server
    return (f"cannot reach {url}: {error or type(error).__name__}\n"
            f"hint: is the server running (`python -m app`, `make serve`)? Point --server or $SGLORA_URL at it "
            f"(now {server})")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 0; 1 with the error, the request tried and a hint on stderr; 2 for a usage error."""
    try:
        app(args=list(sys.argv[1:] if argv is None else argv), prog_name="sglora")
    except SystemExit as e:  # typer's standalone mode ends with SystemExit, also on success
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
