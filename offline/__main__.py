"""`python -m offline build --tiny` and its steps (prepare, train-experts, build-library, train-cvae) run alone.

`--engine ray [--address HOST:PORT]` trains the experts as one Ray task each (offline/engine.py); the local engine
(in this process) is the default. `--shard` reads JOB_COMPLETION_INDEX when it is set (a Kubernetes Indexed Job).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from offline import pipeline
from offline.config import TINY, BuildConfig
from offline.engine import ENGINES, make_engine

cli = typer.Typer(add_completion=False, help="SG-LoRA offline job: experts → library → CVAE.")
ConfigOpt = typer.Option(None, "--config", help="build config JSON (see offline/config.py)")
TinyOpt = typer.Option(False, "--tiny", help="the tiny CPU demo config (synthetic family)")
OutOpt = typer.Option(Path("model_store/tiny"), "--out", help="store directory to write")
EngineOpt = typer.Option("local", "--engine", help=f"where experts train: {' | '.join(ENGINES)}")
AddressOpt = typer.Option(None, "--address", help="ray: cluster address (host:port, ray://..., auto); "
                          "unset: start a local Ray for this run")
TaskCpusOpt = typer.Option(1.0, "--task-cpus", help="ray: CPUs per expert task (fractions allowed)")
TaskGpusOpt = typer.Option(0.0, "--task-gpus", help="GPUs per expert task (ray: a share, 0.25 = four per GPU; "
                           "local: > 0 trains on this process's GPU)")
RetriesOpt = typer.Option(3, "--max-retries", help="ray: re-runs of an expert whose worker died")


def _config(config: Path | None, tiny: bool) -> BuildConfig:
    if tiny == (config is not None):
        raise typer.BadParameter("give exactly one of --config FILE or --tiny")
    return TINY if tiny else BuildConfig.from_file(config)


@cli.command()
def build(config: Path | None = ConfigOpt, tiny: bool = TinyOpt, out: Path = OutOpt, engine: str = EngineOpt,
          address: str | None = AddressOpt, task_cpus: float = TaskCpusOpt, task_gpus: float = TaskGpusOpt,
          max_retries: int = RetriesOpt) -> None:
    """Everything: train-experts → build-library → validate → train-cvae."""
    build_config = _config(config, tiny)
    with _engine(engine, address, task_cpus, task_gpus, max_retries) as eng:
        typer.echo(json.dumps(pipeline.build(build_config, out, engine=eng), indent=2))


@cli.command()
def prepare(config: Path | None = ConfigOpt, tiny: bool = TinyOpt, out: Path = OutOpt) -> None:
    """The shared preparation alone (pretrain the base when the config asks), before parallel train-experts."""
    ctx = pipeline.make_context(_config(config, tiny), out)
    pipeline.ensure_base(ctx)
    typer.echo(f"base weights: {ctx.pretrained()}")


@cli.command("train-experts")
def train_experts(config: Path | None = ConfigOpt, tiny: bool = TinyOpt, out: Path = OutOpt,
                  shard: int = typer.Option(0, envvar="JOB_COMPLETION_INDEX",
                                            help="this job's shard (default: $JOB_COMPLETION_INDEX, else 0)"),
                  num_shards: int = typer.Option(1), engine: str = EngineOpt, address: str | None = AddressOpt,
                  task_cpus: float = TaskCpusOpt, task_gpus: float = TaskGpusOpt,
                  max_retries: int = RetriesOpt) -> None:
    ctx = pipeline.make_context(_config(config, tiny), out)
    with _engine(engine, address, task_cpus, task_gpus, max_retries) as eng:
        trained = pipeline.step_train_experts(ctx, shard=shard, num_shards=num_shards, engine=eng)
    typer.echo(f"trained {len(trained)} experts into {ctx.experts_dir}")


def _engine(name: str, address: str | None, task_cpus: float, task_gpus: float, max_retries: int):
    if name not in ENGINES:
        raise typer.BadParameter(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}", param_hint="--engine")
    if name == "local" and address is not None:
        raise typer.BadParameter("--address needs --engine ray", param_hint="--address")
    if task_cpus < 0 or task_gpus < 0 or (task_cpus == 0 and task_gpus == 0):
        raise typer.BadParameter("a task needs a positive CPU or GPU share", param_hint="--task-cpus/--task-gpus")
    return make_engine(name, address=address, num_cpus=task_cpus, num_gpus=task_gpus, max_retries=max_retries)


@cli.command("build-library")
def build_library(config: Path | None = ConfigOpt, tiny: bool = TinyOpt, out: Path = OutOpt) -> None:
    version = pipeline.step_build_library(pipeline.make_context(_config(config, tiny), out))
    typer.echo(f"wrote store {out} version {version} (no CVAE yet)")


@cli.command()
def validate(config: Path | None = ConfigOpt, tiny: bool = TinyOpt, out: Path = OutOpt, engine: str = EngineOpt,
             address: str | None = AddressOpt, task_cpus: float = TaskCpusOpt, task_gpus: float = TaskGpusOpt,
             max_retries: int = RetriesOpt) -> None:
    """Transfer matrix (on the engine) + transfer router + every choice by leave-one-task-out retrieval."""
    ctx = pipeline.make_context(_config(config, tiny), out)
    with _engine(engine, address, task_cpus, task_gpus, max_retries) as eng:
        version = pipeline.step_validate(ctx, engine=eng)
    typer.echo(f"wrote store {out} version {version} with its validation (run train-cvae next)")


@cli.command("train-cvae")
def train_cvae(config: Path | None = ConfigOpt, tiny: bool = TinyOpt, out: Path = OutOpt) -> None:
    version = pipeline.step_train_cvae(pipeline.make_context(_config(config, tiny), out))
    typer.echo(f"wrote store {out} version {version} with CVAE")


StoreOpt = typer.Option(..., "--store", help="the store directory to change (a new version is written into it)")


@cli.command("add-experts")
def add_experts(
    sources: list[Path] = typer.Argument(..., help="PEFT folders, served adapter files or train-experts expert files"),
    store: Path = StoreOpt,
    descriptions: Path | None = typer.Option(None, "--descriptions", help="JSON {expert id: description}"),
) -> None:
    """Import existing LoRAs into the library as a new store version (a running server switches on reload)."""
    from offline.import_experts import add_experts as run

    texts = json.loads(descriptions.read_text()) if descriptions else {}
    summary = _store_command(lambda: run(store, sources, texts))
    for note in summary.get("notes", []):
        typer.echo(f"note: {note}", err=True)
    typer.echo(json.dumps(summary, indent=2))


@cli.command("remove-experts")
def remove_experts(ids: list[str] = typer.Argument(..., help="expert ids"), store: Path = StoreOpt) -> None:
    """Drop experts from the library as a new store version (their rows stay in the append-only segments)."""
    from offline.import_experts import remove_experts as run

    typer.echo(json.dumps(_store_command(lambda: run(store, ids)), indent=2))


@cli.command("migrate-store")
def migrate_store(store: Path = StoreOpt,
                  dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 on disk")) -> None:
    """Convert a format-1 store (or a format-2 store to another dtype) into format 2."""
    from app.ml.store import migrate_store as run

    typer.echo(f"wrote store {store} version {_store_command(lambda: run(store, dtype))} (format 2, {dtype})")


@cli.command("verify-store")
def verify_store(store: Path = StoreOpt) -> None:
    """Re-hash every file, segment and expert row (start-up checks sizes and headers; rows on first use)."""
    from app.ml.store import verify_store as run

    typer.echo(json.dumps(_store_command(lambda: run(store))))


def _store_command(action):
    """Run a store command; a StoreError becomes a one-line message and exit status 1 (no traceback)."""
    from app.ml.store import StoreError

    try:
        return action()
    except StoreError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@cli.command(context_settings={"allow_extra_args": True})
def evaluate(
    ctx: typer.Context,
    config: Path | None = ConfigOpt,
    tiny: bool = TinyOpt,
    preset: str | None = typer.Option(None, "--preset", help="a named build config: tiny | paper-synthetic"),
    out: Path = typer.Option(Path("reports/eval"), "--out", help="report directory (stores go to <out>/seed<i>)"),
    seeds: list[int] = typer.Option([0, 1, 2, 3, 4], "--seeds", help="one or more seeds (default 5): --seeds 0 1 2"),
    eval_dataset: Path | None = typer.Option(None, "--eval-dataset",
                                             help="DatasetConfig JSON of dataset B: cross-dataset mode"),
    store: Path | None = typer.Option(None, "--store", help="evaluate this built store (one seed) instead"),
    max_tasks: int | None = typer.Option(None, "--max-tasks", help="only the first N unseen tasks"),
    checks: bool = typer.Option(True, "--checks/--no-checks", help="shuffled / coverage / spread / sweep"),
    only_checks: list[str] = typer.Option([], "--check", help="run only this check (repeatable): semantic | "
                                          "coverage | spread | sweep"),
    examples: list[int] = typer.Option([], "--examples", help="rows for the default refined on N examples drawn "
                                       "from each unseen task's training pairs: --examples 1 --examples 8"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Strategies vs zero-shot and oracle on unseen tasks: R@1/5/10 both ways, headroom, checks, over seeds."""
    from dataclasses import replace

    from offline import evaluate as ev
    from offline.config import DatasetConfig

    if sum([config is not None, tiny, preset is not None]) != 1:
        raise typer.BadParameter("give exactly one of --config FILE, --tiny or --preset NAME")
    if preset is not None and preset not in ev.PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}: choose one of {sorted(ev.PRESETS)}")
    try:
        seeds = seeds + [int(a) for a in ctx.args]  # `--seeds 0 1 2`: click leaves 1 and 2 as extra arguments
    except ValueError as e:
        raise typer.BadParameter(f"unexpected arguments {ctx.args}") from e
    build_config = ev.PRESETS[preset] if preset else _config(config, tiny)
    dataset_b = DatasetConfig(**json.loads(eval_dataset.read_text())) if eval_dataset else None
    unknown = set(only_checks) - set(ev.EvalConfig().check_names)
    if unknown:
        raise typer.BadParameter(f"unknown checks {sorted(unknown)}: choose among {ev.EvalConfig().check_names}")
    eval_cfg = replace(ev.EvalConfig(), max_tasks=max_tasks, checks=checks, examples=tuple(examples))
    if only_checks:
        eval_cfg = replace(eval_cfg, check_names=tuple(only_checks))
    report = ev.run_evaluation(build_config, out, seeds, eval_cfg,
                               eval_dataset=dataset_b, store_dir=store, device=device)
    typer.echo(report.markdown)
    typer.echo(f"wrote {out}/report.md, results.json, recall.png, split.json, config.json")


@cli.command("fewshot-select", context_settings={"allow_extra_args": True})
def fewshot_select(
    ctx: typer.Context,
    preset: str = typer.Option("paper-synthetic", "--preset", help="a named build config: tiny | paper-synthetic"),
    out: Path = typer.Option(Path("reports/eval"), "--out", help="as evaluate's: stores in <out>/seed<i>/store"),
    seeds: list[int] = typer.Option([0], "--seeds", help="one or more seeds: --seeds 0 1"),
    counts: list[int] = typer.Option([4, 8], "--examples", help="examples per seen task (repeat the option)"),
    max_tasks: int | None = typer.Option(None, "--max-tasks", help="only the first N seen tasks"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Few-shot methods side by side on SEEN tasks left out one at a time (never the unseen ones)."""
    from offline import evaluate as ev
    from offline.fewshot_eval import run_selection

    if preset not in ev.PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}: choose one of {sorted(ev.PRESETS)}")
    seeds = seeds + [int(a) for a in ctx.args]
    result = run_selection(ev.PRESETS[preset], out, seeds, counts, max_tasks=max_tasks, device=device)
    typer.echo(json.dumps(result["summary"], indent=2))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli()


if __name__ == "__main__":
    main()
