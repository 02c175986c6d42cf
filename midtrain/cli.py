"""The command line: subcommands mirror the user's steps. Thin: parse, dispatch, print.

Heavy libraries (torch, ray, deepspeed, datasets) are imported inside the commands so that
``midtrain --help`` and config errors come back at once.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from midtrain import __version__
from midtrain.console import json_text
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
      eval / report      held-out perplexity per source: domain gain vs. forgetting
      slurm / jobs       run on a Slurm or Ray cluster; job status, logs, stop
    """


# --- data ---------------------------------------------------------------------------------------


@cli.group()
def tokenizer() -> None:
    """Build a tokenizer (for tests and demos; real runs use the base model's)."""


@tokenizer.command("train")
@click.option("--input", "inputs", multiple=True, required=True, help=INPUTS_HELP)
@click.option("--vocab-size", type=click.IntRange(min=257), required=True)
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
    from midtrain.config_io import validate
    from midtrain.data_mixing.prepare import PrepareConfig, prepare_corpus

    options = {
        "inputs": list(inputs),
        "tokenizer": tokenizer_dir,
        "output": output,
        "text_field": text_field,
        "num_proc": num_proc,
        "holdout_fraction": holdout_fraction,
        "strict": strict,
        "paragraphs": paragraphs,
    }
    prepare_corpus(validate(PrepareConfig, options, "data prepare"))


@data.command("sample-corpora")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="directory")
@click.option(
    "--max-chars",
    type=click.IntRange(min=1000),
    default=2_000_000,
    show_default=True,
    help="characters of text per corpus",
)
def data_sample_corpora(output: str, max_chars: int) -> None:
    """Build two sample corpora from text on this machine (for demos and trials).

    general.jsonl: Python standard-library docstrings (a curated general corpus);
    legal.jsonl: the license texts installed packages ship (a customer's legal corpus).
    """
    from midtrain.data_mixing.sample_corpora import build_sample_corpora

    for name, path in build_sample_corpora(output, max_chars).items():
        click.echo(f"{name}: {path}")


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
        where = f"{spec}: mixture"  # an inline mixture has no file of its own to name
        plan = plan_mixture(run.mixture, total_sequences=run.total_sequences, where=where)
    else:
        plan = plan_mixture(load_mixture(spec, list(overrides)))
    if as_json:
        click.echo(json_text(plan.to_json()))
    else:
        plan.print()


# --- checkpoints --------------------------------------------------------------------------------


@cli.group()
def ckpt() -> None:
    """Browse, verify, prune, import and export checkpoints."""


@ckpt.command("list")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print a JSON list on stdout, newest last")
@click.option("--verify", is_flag=True, help="re-hash every file (slower)")
def ckpt_list(path: str, as_json: bool, verify: bool) -> None:
    """The checkpoints of a run (or of every run under a root): step, tokens, LR, phase, loss."""
    from midtrain.checkpoints import list_checkpoints, print_table, to_json

    infos = list_checkpoints(path, verify=verify)
    if as_json:
        click.echo(json_text(to_json(infos)))
    else:
        print_table(infos)


@ckpt.command("show")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print JSON on stdout")
@click.option("--verify", is_flag=True, help="re-hash every file")
def ckpt_show(path: str, as_json: bool, verify: bool) -> None:
    """One checkpoint: its manifest, model, schedule position and files."""
    from midtrain.checkpoints import show_checkpoint

    show_checkpoint(path, as_json=as_json, verify=verify)


@ckpt.command("verify")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def ckpt_verify(path: str) -> None:
    """Re-hash every file against the manifest; exit 1 naming each missing or altered file."""
    from midtrain.checkpoints import resolve_checkpoint, verify_checkpoint

    problems = verify_checkpoint(path)
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{resolve_checkpoint(path)}: verified")


@ckpt.command("prune")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--keep-last", type=click.IntRange(min=1), help="default: the run spec's checkpoint.keep_last"
)
@click.option("--dry-run", is_flag=True, help="only show what would be deleted")
def ckpt_prune(run_dir: str, keep_last: int | None, dry_run: bool) -> None:
    """Delete all but the newest N complete checkpoints (and those marked keep, and latest)."""

    from midtrain.checkpoints import prune
    from midtrain.checkpoints.layout import CHECKPOINTS_DIR
    from midtrain.config_io import load_yaml_mapping

    if keep_last is None:  # the run's own setting, from the spec the trainer saved in the run dir
        run = Path(run_dir)
        spec_file = (run.parent if run.name == CHECKPOINTS_DIR else run) / "run_spec.yaml"
        if not spec_file.is_file():
            raise MidtrainError(f"{spec_file}: not found; give --keep-last N")
        saved = load_yaml_mapping(spec_file)
        keep_last = (saved.get("checkpoint") or {}).get("keep_last")
        if not isinstance(keep_last, int) or keep_last < 1:
            raise MidtrainError(f"{spec_file}: no checkpoint.keep_last; give --keep-last N")
    for path in prune(run_dir, keep_last, dry_run=dry_run):
        click.echo(f"{'would delete' if dry_run else 'deleted'} {path}")


@ckpt.command("keep")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--unset", is_flag=True, help="remove the mark")
def ckpt_keep(path: str, unset: bool) -> None:
    """Mark a checkpoint `keep`: retention never deletes it (e.g. a published branch point)."""
    from midtrain.checkpoints import mark_keep

    marked = mark_keep(path, keep=not unset)  # a run dir: the checkpoint `latest` names
    click.echo(f"{marked}: keep={'no' if unset else 'yes'}")


@ckpt.command("import-hf")
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path())
def ckpt_import_hf(hf_dir: str, out: str) -> None:
    """Make a start checkpoint from a local Hugging Face model directory (Llama, Mistral, Qwen2)."""
    from midtrain.checkpoints import import_hf

    click.echo(f"imported {hf_dir} -> {import_hf(hf_dir, out)}")


@ckpt.command("export-hf")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path())
def ckpt_export_hf(path: str, out: str) -> None:
    """Write a plain Hugging Face directory (config, safetensors, tokenizer) for serving/eval."""
    from midtrain.checkpoints import export_hf

    click.echo(f"exported {path} -> {export_hf(path, out)}")


# --- training -----------------------------------------------------------------------------------


@cli.group()
def schedule() -> None:
    """Learning-rate schedules."""


@schedule.command("plot")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="lr_schedule.png",
    show_default=True,
    help="PNG to write",
)
def schedule_plot(spec: str, overrides: tuple[str, ...], out: str) -> None:
    """Plot the learning rate over the run described by a run spec."""
    from midtrain.config import load_run_spec
    from midtrain.training.schedule import plot_schedule

    run = load_run_spec(spec, list(overrides))
    rewarm_from = None
    if run.init_from is not None:  # a re-warm starts at the LR the start checkpoint was saved at
        from midtrain.checkpoints import load_checkpoint

        rewarm_from = load_checkpoint(run.init_from.checkpoint, verify=False).manifest.lr
    sched = run.schedule.build(
        peak_lr=run.optimizer.lr, total_steps=run.train.max_steps, rewarm_from_lr=rewarm_from
    )
    plot_schedule(sched, run.train.max_steps, out, title=f"{run.schedule.kind}: {spec}")
    click.echo(f"wrote {out}")


@cli.command("train", context_settings={"ignore_unknown_options": False})
@click.argument("spec", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--workers", type=click.IntRange(min=1), help="data-parallel workers (= workers=N)")
@click.option("--resume", "resume_dir", metavar="RUN_DIR", help="continue this run exactly")
@click.option("--auto-resume", is_flag=True, help="resume if the run has a checkpoint, else start")
@click.option(
    "--allow-changed-spec", is_flag=True, help="resume despite changes that break exactness"
)
@click.option(
    "--ray-address",
    metavar="URL",
    help="submit to this Ray cluster's Jobs API (http://head:8265; or RAY_ADDRESS=http://...)",
)
def train(
    spec: str | None,
    overrides: tuple[str, ...],
    workers: int | None,
    resume_dir: str | None,
    auto_resume: bool,
    allow_changed_spec: bool,
    ray_address: str | None,
) -> None:
    """Train: pretrain, branch from a checkpoint (init_from), or resume a run.

    \b
    midtrain train run.yaml [key.sub=value ...]     a new run (embedded local Ray)
    midtrain train --resume RUN_DIR                 continue a run exactly
    midtrain train run.yaml --ray-address http://head:8265
                                                    submit it as a job to a Ray cluster
    RAY_ADDRESS=host:6379 midtrain train run.yaml   drive it from here on a Ray cluster

    Exit status: 0 completed, 75 stopped by SIGTERM/SIGUSR1 with a checkpoint saved (requeue to
    resume), 1 failed, 2 bad input. A Ray job returns its driver's status.
    """
    from midtrain.launch.ray_cluster import env_jobs_address, submit_run

    extra = list(overrides)
    if spec is not None and re.match(r"[A-Za-z_][A-Za-z0-9_.]*=", spec) and not Path(spec).exists():
        spec, extra = None, [spec, *extra]  # `midtrain train --resume DIR key=value`
    if workers is not None:
        extra.append(f"workers={workers}")
    address = ray_address or env_jobs_address()
    if address is None and spec is not None:  # the spec may name a cluster's Jobs address too
        from midtrain.config import load_run_spec
        from midtrain.launch.ray_cluster import is_jobs_address

        named = load_run_spec(spec, extra).launch.ray_address
        address = named if is_jobs_address(named) else None
    if address is not None:
        sys.exit(submit_run(address, spec, extra, resume_dir, auto_resume, allow_changed_spec))

    from midtrain.launch.local import run_on_ray
    from midtrain.launch.start import prepare_run

    prepared = prepare_run(spec, extra, resume_dir, allow_changed_spec, auto_resume)
    sys.exit(run_on_ray(prepared))


# --- evaluation ---------------------------------------------------------------------------------


def _eval_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options that choose what to evaluate on, shared by `eval` and `report`."""
    options = [
        click.option("--mixture", type=click.Path(dir_okay=False), help="sources from this file"),
        click.option(
            "--data", multiple=True, metavar="PREFIX", help="a prepared prefix; repeatable"
        ),
        click.option("--seq-length", type=click.IntRange(min=2), help="window length (tokens)"),
        click.option(
            "--max-tokens", type=click.IntRange(min=1), help="held-out tokens per source [200000]"
        ),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
        click.option("--device", help="cpu, cuda, cuda:1 (default: a GPU if there is one)"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _evaluate_and_report(
    paths: list[str], out: str, baseline: str | None, all_checkpoints: bool, **opts: Any
) -> None:
    from midtrain.evaluation import (
        DEFAULT_MAX_TOKENS,
        EvalOptions,
        check_report_dir,
        evaluate,
        print_summary,
        write_report,
    )

    out_dir = check_report_dir(out)  # before the long part, not after it
    options = EvalOptions(
        mixture=opts["mixture"],
        data=list(opts["data"]),
        seq_length=opts["seq_length"],
        max_tokens=opts["max_tokens"] or DEFAULT_MAX_TOKENS,
        batch_size=opts["batch_size"],
        device=opts["device"],
    )
    ev = evaluate(paths, options, baseline=baseline, all_checkpoints=all_checkpoints)
    print_summary(ev)
    click.echo(f"report: {write_report(ev, out_dir)}")


@cli.command("eval")
@click.argument("path")
@click.option(
    "--baseline", metavar="CKPT", help="compare with this checkpoint (default: the start)"
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="report directory")
@_eval_options
def eval_cmd(path: str, baseline: str | None, out: str, **opts: Any) -> None:
    """Held-out perplexity per source of a checkpoint, or of every checkpoint of a run.

    \b
    midtrain eval runs/legal/checkpoints/step_00000100 --baseline base/ckpt --out reports/legal
    midtrain eval runs/legal --out reports/legal          (curves over the run's checkpoints)

    The sources (and their held-out splits) come from the run's mixture unless --mixture or --data
    is given. A run that branched (init_from) is compared with its start checkpoint: domain gain on
    customer sources, forgetting on curated ones.
    """
    _evaluate_and_report([path], out, baseline, all_checkpoints=True, **opts)


@cli.command("report")
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--baseline", metavar="CKPT", help="compare every run with this checkpoint")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="report directory")
@_eval_options
def report_cmd(run_dirs: tuple[str, ...], baseline: str | None, out: str, **opts: Any) -> None:
    """Compare several runs side by side: curves, final table, gain vs. forgetting chart."""
    _evaluate_and_report(list(run_dirs), out, baseline, all_checkpoints=True, **opts)


@cli.command("eval-tasks")
@click.argument("ckpt")
@click.option("--tasks-dir", required=True, type=click.Path(file_okay=False), help="task YAMLs")
@click.option("--task", "tasks", multiple=True, required=True, help="task name; repeatable")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--limit", type=click.IntRange(min=1), help="at most this many items per task")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", help="cpu, cuda (default: a GPU if there is one)")
def eval_tasks(
    ckpt: str,
    tasks_dir: str,
    tasks: tuple[str, ...],
    out: str,
    limit: int | None,
    batch_size: int,
    device: str | None,
) -> None:
    """Downstream tasks with lm-evaluation-harness on the exported model (extra: midtrain[eval])."""
    from midtrain.evaluation.downstream import run_tasks

    results = run_tasks(
        ckpt, tasks_dir, list(tasks), out, device=device, batch_size=batch_size, limit=limit
    )
    click.echo(json_text(results))


# --- clusters -----------------------------------------------------------------------------------


def _slurm_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The job's shape and Slurm settings, shared by `slurm render` and `slurm submit`."""
    options = [
        click.argument("spec", type=click.Path(dir_okay=False)),
        click.argument("overrides", nargs=-1),
        click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True),
        click.option("--gpus-per-node", type=click.IntRange(min=0), default=0, show_default=True),
        click.option("--partition", help="a partition, or a comma-separated list"),
        click.option("--time", "time_limit", metavar="TIME", help="limit: MIN, H:M:S, D-H:M:S"),
        click.option("--account", help="the account to charge"),
        click.option("--job-name", help="default: midtrain-<run dir name>"),
        click.option(
            "--cpus-per-node",
            type=click.IntRange(min=1),
            help="CPUs per node, for Slurm and Ray [workers per node x launch.cpus_per_worker + 1]",
        ),
        click.option(
            "--signal-seconds",
            type=click.IntRange(min=10, max=65535),
            default=300,
            show_default=True,
            help="SIGUSR1 (checkpoint, requeue) this long before the time limit",
        ),
        click.option(
            "--extra-sbatch",
            multiple=True,
            metavar="--OPT=VALUE",
            help="another #SBATCH option, e.g. --constraint=h100; repeatable",
        ),
        click.option(
            "--env",
            multiple=True,
            metavar="KEY=VALUE",
            help="exported in the job (NCCL_*, HF_HOME, ...); repeatable",
        ),
        click.option("--python", help="the nodes' Python with midtrain [this one]"),
        click.option(
            "--allow-changed-spec", is_flag=True, help="resume despite changes that break exactness"
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _render_args(opts: dict[str, Any]) -> tuple[str, list[str], Any]:
    from midtrain.launch.slurm import SlurmOptions

    options = SlurmOptions(
        nodes=opts["nodes"],
        gpus_per_node=opts["gpus_per_node"],
        partition=opts["partition"],
        time=opts["time_limit"],
        account=opts["account"],
        job_name=opts["job_name"],
        cpus_per_node=opts["cpus_per_node"],
        signal_seconds=opts["signal_seconds"],
        extra_sbatch=tuple(opts["extra_sbatch"]),
        env=tuple(opts["env"]),
        allow_changed_spec=opts["allow_changed_spec"],
        **({"python": opts["python"]} if opts["python"] else {}),
    )
    return opts["spec"], list(opts["overrides"]), options


@cli.group()
def slurm() -> None:
    """Run on a Slurm cluster: one job with a Ray cluster inside, requeued on preemption."""


@slurm.command("render")
@_slurm_options
def slurm_render(**opts: Any) -> None:
    """Print the batch script for a run spec (every value in it validated)."""
    from midtrain.launch.slurm import render_job

    click.echo(render_job(*_render_args(opts)).script, nl=False)


@slurm.command("submit")
@_slurm_options
def slurm_submit(**opts: Any) -> None:
    """Submit the run as a Slurm job; prints the job id (the script is kept in RUN_DIR/slurm/)."""
    from midtrain.console import console
    from midtrain.launch.slurm import submit_job

    job_id, script = submit_job(*_render_args(opts))
    console.print(f"submitted Slurm job {job_id} ({script}); `midtrain jobs logs {job_id}`")
    click.echo(job_id)


RAY_ADDRESS_OPTION = click.option(
    "--ray-address", metavar="URL", help="for Ray jobs: http://head:8265 [RAY_ADDRESS]"
)


@cli.group()
def jobs() -> None:
    """Cluster runs: Slurm job ids (numbers) and Ray job ids (midtrain-...)."""


@jobs.command("status")
@click.argument("job_id", required=False)
@RAY_ADDRESS_OPTION
def jobs_status(job_id: str | None, ray_address: str | None) -> None:
    """One job's state, or midtrain's jobs on Slurm and on the Ray cluster."""
    from midtrain.launch.jobs import show_status

    show_status(job_id, ray_address)


@jobs.command("logs")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="keep printing until the job ends")
@RAY_ADDRESS_OPTION
def jobs_logs(job_id: str, follow: bool, ray_address: str | None) -> None:
    """A job's output (a Slurm job's log file, a Ray job's driver log)."""
    from midtrain.launch.jobs import show_logs

    show_logs(job_id, ray_address, follow)


@jobs.command("stop")
@click.argument("job_id")
@click.option("--force", is_flag=True, help="Slurm: cancel at once, without a checkpoint")
@RAY_ADDRESS_OPTION
def jobs_stop(job_id: str, force: bool, ray_address: str | None) -> None:
    """Stop a job: it saves a checkpoint and ends (resume it later); no requeue."""
    from midtrain.launch.jobs import stop_job

    stop_job(job_id, ray_address, force)


@cli.command("demo")
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--customer-share",
    type=click.FloatRange(0.05, 0.95),
    default=0.8,
    show_default=True,
    help="share of tokens from the customer corpus when branching",
)
def demo(out: str, customer_share: float) -> None:
    """The whole product on this machine in minutes: prepare, pretrain, branch, evaluate."""

    from midtrain.demo import run_demo

    run_demo(Path(out).resolve(), customer_share)


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
    except OSError as exc:
        # A file the user named cannot be read or written (a directory, no permission, a full
        # disk): one line naming it. Other OS errors keep their traceback.
        if exc.filename is None or verbose():
            raise
        click.echo(f"error: {exc.filename}: {exc.strerror or exc}", err=True)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
