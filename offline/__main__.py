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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli()


if __name__ == "__main__":
    main()
