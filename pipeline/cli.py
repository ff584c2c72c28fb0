"""The `strata` command: parses arguments and calls the library; user errors become one line.

    strata run CONFIG.yaml [--set key.path=value ...]
    strata status OUTPUT_URI [--json]
    strata validate CONFIG.yaml [--set ...]
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import load_config, to_yaml
from pipeline.errors import StrataError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Embeddings from any encoder layers, for large corpora.")
err = Console(stderr=True, soft_wrap=True)
out = Console()

SetOption = typer.Option(None, "--set", help="Override a config key, e.g. --set output.uri=./out/run2 (repeatable)")


@app.command()
def run(config: str = typer.Argument(..., help="YAML config file"), overrides: Optional[list[str]] = SetOption):
    """Embed the corpus; resumes where an earlier run of the same output stopped."""
    from pipeline import runner

    runner.run(load_config(config, overrides), console=err)


@app.command()
def validate(config: str = typer.Argument(..., help="YAML config file"), overrides: Optional[list[str]] = SetOption):
    """Check a config against its model and input, and print it fully resolved."""
    from pipeline.runner import make_plan

    cfg = load_config(config, overrides)
    plan = make_plan(cfg)
    out.print(to_yaml(cfg), end="", markup=False, highlight=False)
    shards = len({f.shard.source for f in plan.fragments})
    err.print(
        f"ok: model {plan.model.name} ({plan.model.num_layers} layers, hidden {plan.model.hidden_size}, "
        f"max_length {plan.model.max_length}); {shards} shards, {plan.total_rows:,} rows, "
        f"{len(plan.fragments)} fragments; outputs "
        + ", ".join(f"{o.name}: layers {list(o.layers)}" for o in plan.outputs)
    )


@app.command()
def status(output_uri: str = typer.Argument(..., help="Output location of a run"),
           as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON")):
    """Progress and totals of a run, read from its manifest."""
    from pipeline.manifest import Manifest
    from pipeline.storage import Location

    manifest = Manifest(Location.from_uri(output_uri))
    run_info = manifest.read_run()
    if run_info is None:
        raise StrataError(f"{output_uri} holds no strata run (no _manifest/run.json)")
    records = manifest.records()
    failures = manifest.failures()
    report = {
        "output": output_uri,
        "fingerprint": run_info["fingerprint"],
        "model": run_info["model"]["name"],
        "fragments_planned": run_info["plan"]["fragments"],
        "fragments_committed": len(records),
        "fragments_pending": max(run_info["plan"]["fragments"] - len(records), 0),
        "fragments_failed": sum(1 for f in failures if f.rows is not None),
        "shards_failed": sum(1 for f in failures if f.rows is None),
        "rows_planned": run_info["plan"]["rows"],
        "docs": sum(r.docs for r in records),
        "quarantined": sum(r.quarantined for r in records),
        "blank": sum(r.blank for r in records),
        "tokens": sum(r.tokens for r in records),
        "last_run": run_info.get("summary"),
        "failures": [asdict(f) for f in failures],
    }
    if as_json:
        out.print_json(json.dumps(report))
        return
    table = Table(title=f"strata status: {output_uri}", show_header=False)
    for key, value in report.items():
        if key not in ("last_run", "failures"):
            table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    out.print(table)
    if failures:
        failed = Table("fragment / shard", "source", "rows", "reason", title="failed in the last run (a rerun retries them)")
        for f in failures:
            failed.add_row(f.fragment, f.source, "?" if f.rows is None else f"{f.rows:,}", f.reason)
        out.print(failed)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local folders, never a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(standalone_mode=False)
    except StrataError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted; rerun the same command to resume")
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
