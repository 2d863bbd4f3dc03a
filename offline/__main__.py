"""`python -m offline build --tiny` and its steps (train-experts, build-library, train-cvae) run alone."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from offline import pipeline
from offline.config import TINY, BuildConfig

cli = typer.Typer(add_completion=False, help="SG-LoRA offline job: experts → library → CVAE.")
ConfigOpt = typer.Option(None, "--config", help="build config JSON (see offline/config.py)")
TinyOpt = typer.Option(False, "--tiny", help="the tiny CPU demo config (synthetic family)")
OutOpt = typer.Option(Path("model_store/tiny"), "--out", help="store directory to write")


def _config(config: Path | None, tiny: bool) -> BuildConfig:
    if tiny == (config is not None):
        raise typer.BadParameter("give exactly one of --config FILE or --tiny")
    return TINY if tiny else BuildConfig.from_file(config)


@cli.command()
def build(config: Path | None = ConfigOpt, tiny: bool = TinyOpt, out: Path = OutOpt) -> None:
    """Everything: train-experts → build-library → train-cvae."""
    typer.echo(json.dumps(pipeline.build(_config(config, tiny), out), indent=2))


@cli.command("train-experts")
def train_experts(config: Path | None = ConfigOpt, tiny: bool = TinyOpt, out: Path = OutOpt,
                  shard: int = typer.Option(0), num_shards: int = typer.Option(1)) -> None:
    ctx = pipeline.make_context(_config(config, tiny), out)
    trained = pipeline.step_train_experts(ctx, shard=shard, num_shards=num_shards)
    typer.echo(f"trained {len(trained)} experts into {ctx.experts_dir}")


@cli.command("build-library")
def build_library(config: Path | None = ConfigOpt, tiny: bool = TinyOpt, out: Path = OutOpt) -> None:
    version = pipeline.step_build_library(pipeline.make_context(_config(config, tiny), out))
    typer.echo(f"wrote store {out} version {version} (no CVAE yet)")


@cli.command("train-cvae")
def train_cvae(config: Path | None = ConfigOpt, tiny: bool = TinyOpt, out: Path = OutOpt) -> None:
    version = pipeline.step_train_cvae(pipeline.make_context(_config(config, tiny), out))
    typer.echo(f"wrote store {out} version {version} with CVAE")


@cli.command(context_settings={"allow_extra_args": True})
def evaluate(
    ctx: typer.Context,
    config: Path | None = ConfigOpt,
    tiny: bool = TinyOpt,
    preset: str | None = typer.Option(None, "--preset", help="a named build config: tiny | paper-synthetic"),
    out: Path = typer.Option(Path("reports/eval"), "--out", help="report directory (stores go to <out>/seed<i>)"),
    seeds: list[int] = typer.Option([0], "--seeds", help="one or more seeds: --seeds 0 1 2"),
    eval_dataset: Path | None = typer.Option(None, "--eval-dataset",
                                             help="DatasetConfig JSON of dataset B: cross-dataset mode"),
    store: Path | None = typer.Option(None, "--store", help="evaluate this built store (one seed) instead"),
    max_tasks: int | None = typer.Option(None, "--max-tasks", help="only the first N unseen tasks"),
    checks: bool = typer.Option(True, "--checks/--no-checks", help="shuffled / coverage / spread / sweep"),
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
    report = ev.run_evaluation(build_config, out, seeds, replace(ev.EvalConfig(), max_tasks=max_tasks, checks=checks),
                               eval_dataset=dataset_b, store_dir=store, device=device)
    typer.echo(report.markdown)
    typer.echo(f"wrote {out}/report.md, results.json, recall.png, split.json, config.json")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli()


if __name__ == "__main__":
    main()
