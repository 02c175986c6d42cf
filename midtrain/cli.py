"""The command line: subcommands mirror the user's steps. Thin: parse, dispatch, print.

Heavy libraries (torch, ray, deepspeed, datasets) are imported inside the commands so that
``midtrain --help`` and config errors come back at once.
"""

from __future__ import annotations

import json
import sys

import click

from midtrain import __version__
from midtrain.errors import MidtrainError
from midtrain.runtime_env import setup_process, verbose

INPUTS_HELP = "jsonl (.gz), parquet, .txt, a saved HF dataset, a directory or a glob; repeatable"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="midtrain")
def cli() -> None:
    """Continued pretraining from mid-training checkpoints.

    \b
    The steps:
      tokenizer / data   prepare your corpora as tokenized, indexed datasets
      mix                plan a mixture of customer and curated sources
      ckpt               browse, verify, import and export checkpoints
      schedule / train   plan the learning rate, then train (locally or on a Ray cluster)
    """


# --- data ---------------------------------------------------------------------------------------


@cli.group()
def tokenizer() -> None:
    """Build a tokenizer (for tests and demos; real runs use the base model's)."""


@tokenizer.command("train")
@click.option("--input", "inputs", multiple=True, required=True, help=INPUTS_HELP)
@click.option("--vocab-size", type=click.IntRange(min=64), required=True)
@click.option("--output", type=click.Path(file_okay=False), required=True, help="directory")
@click.option("--text-field", default="text", show_default=True, help="JSON/parquet text column")
@click.option("--paragraphs", is_flag=True, help="a .txt file holds one document per paragraph")
def tokenizer_train(
    inputs: tuple[str, ...], vocab_size: int, output: str, text_field: str, paragraphs: bool
) -> None:
    """Train a byte-level BPE tokenizer on local text; AutoTokenizer loads the output."""
    from midtrain.data_mixing.tokenizer import train_tokenizer

    path = train_tokenizer(
        list(inputs), vocab_size, output, text_field=text_field, paragraphs=paragraphs
    )
    click.echo(f"tokenizer saved to {path}")


@cli.group()
def data() -> None:
    """Prepare corpora: tokenize into megatron-core indexed datasets."""


@data.command("prepare")
@click.option("--input", "inputs", multiple=True, required=True, help=INPUTS_HELP)
@click.option("--tokenizer", "tokenizer_dir", required=True, help="tokenizer directory")
@click.option("--output", required=True, help="PREFIX: writes PREFIX.bin/.idx/.stats.json")
@click.option("--text-field", default="text", show_default=True)
@click.option("--num-proc", type=click.IntRange(min=1), default=None, help="parallel workers")
@click.option(
    "--holdout-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.0,
    show_default=True,
    help="share of documents held out for evaluation",
)
@click.option("--strict", is_flag=True, help="fail on the first malformed record")
@click.option("--paragraphs", is_flag=True, help="a .txt file holds one document per paragraph")
def data_prepare(
    inputs: tuple[str, ...],
    tokenizer_dir: str,
    output: str,
    text_field: str,
    num_proc: int | None,
    holdout_fraction: float,
    strict: bool,
    paragraphs: bool,
) -> None:
    """Tokenize a corpus into PREFIX.bin/.idx (+ a held-out split) and PREFIX.stats.json."""
    from midtrain.data_mixing.prepare import PrepareConfig, prepare_corpus

    cfg = PrepareConfig(
        inputs=list(inputs),
        tokenizer=tokenizer_dir,
        output=output,
        text_field=text_field,
        num_proc=num_proc,
        holdout_fraction=holdout_fraction,
        strict=strict,
        paragraphs=paragraphs,
    )
    prepare_corpus(cfg)


@cli.group()
def mix() -> None:
    """Plan data mixtures before spending any GPU time."""


@mix.command("plan")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON on stdout")
def mix_plan(spec: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Tokens drawn per source and stage, and epochs of each source, for a mixture or run spec."""
    from midtrain.config_io import load_yaml_mapping
    from midtrain.data_mixing.mixture import load_mixture
    from midtrain.data_mixing.plan import plan_mixture

    if "mixture" in load_yaml_mapping(spec):  # a run spec: its length is max_steps x batch
        from midtrain.config import load_run_spec

        run = load_run_spec(spec, list(overrides))
        plan = plan_mixture(run.mixture, total_sequences=run.total_sequences)
    else:
        plan = plan_mixture(load_mixture(spec, list(overrides)))
    if as_json:
        click.echo(json.dumps(plan.to_json(), indent=2))
    else:
        plan.print()


# --- training -----------------------------------------------------------------------------------


@cli.group()
def schedule() -> None:
    """Learning-rate schedules."""


@schedule.command("plot")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--out", default="lr_schedule.png", show_default=True, help="PNG to write")
def schedule_plot(spec: str, overrides: tuple[str, ...], out: str) -> None:
    """Plot the learning rate over the run described by a run spec."""
    from midtrain.config import load_run_spec
    from midtrain.training.schedule import plot_schedule

    run = load_run_spec(spec, list(overrides))
    sched = run.schedule.build(peak_lr=run.optimizer.lr, total_steps=run.train.max_steps)
    plot_schedule(sched, run.train.max_steps, out, title=f"{run.schedule.kind}: {spec}")
    click.echo(f"wrote {out}")


def main() -> None:
    setup_process()
    try:
        rc = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MidtrainError as exc:
        if verbose():
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
