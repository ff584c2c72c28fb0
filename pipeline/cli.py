"""The `strata` command: parses arguments and calls the library; user errors become one line.

    strata run CONFIG.yaml [--set key.path=value ...] [--incremental]
    strata status OUTPUT_URI [--json]
    strata gc OUTPUT_URI --keep N [--dry-run]
    strata validate CONFIG.yaml [--set ...]
    strata index OUTPUT_URI --column NAME --to DB [--layer N] [--metric cosine|dot|l2] [--rebuild]
    strata search DB "query text" [-k 10] [--where SQL] [--json]
    strata probe OUTPUT_URI [--label FIELD] [--column NAME ...] [--report DIR] [--json]
    strata bench [--corpus FILE] [--docs N] [--model minilm|bert-base|FOLDER ...] [--json FILE]
    strata submit CONFIG.yaml --address http://HEAD:8265 [--follow] [--set ...]
    strata jobs list|show|logs|stop [JOB_ID] --address http://HEAD:8265
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict
from typing import Optional

import typer
from rich.console import Console
from rich.table import Column, Table

from pipeline.config import load_config, to_yaml
from pipeline import errors
from pipeline.errors import StrataError, Terminated

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Embeddings from any encoder layers, for large corpora.")
err = Console(stderr=True, soft_wrap=True)
out = Console()

SetOption = typer.Option(None, "--set", help="Override a config key, e.g. --set output.uri=./out/run2 (repeatable)")
AddressOption = typer.Option(None, "--address", help="The head's Ray job server, http://HEAD:8265 "
                                                     "(default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS)")
jobs_app = typer.Typer(no_args_is_help=True, help="strata's jobs on a Ray cluster: list, show, logs, stop.")
app.add_typer(jobs_app, name="jobs")


@app.command()
def run(config: str = typer.Argument(..., help="YAML config file"), overrides: Optional[list[str]] = SetOption,
        if_free: bool = typer.Option(False, "--if-free", help="Exit 0 without running when another run holds the "
                                                              "output (for schedules)"),
        incremental: bool = typer.Option(False, "--incremental", help="Publish a new version of the output that "
                                                                      "embeds only what changed (run.mode: incremental)")):
    """Embed the corpus; resumes where an earlier run of the same output stopped."""
    from pipeline import runner

    overrides = [*(overrides or []), *(["run.mode=incremental"] if incremental else [])]
    runner.run(load_config(config, overrides), console=err, if_free=if_free)


@app.command()
def validate(config: str = typer.Argument(..., help="YAML config file"), overrides: Optional[list[str]] = SetOption):
    """Check a config against its model and input, and print it fully resolved."""
    from pipeline.model import check_model_folder, check_weights_load
    from pipeline.progress import count_of
    from pipeline.runner import count_shards, describe_outputs, make_plan

    cfg = load_config(config, overrides)
    plan = make_plan(cfg)
    check_model_folder(plan.model, with_transformers=True)
    check_weights_load(plan.model)  # what a replica does first: a model that cannot load fails here, not in the run
    rows, bad = count_shards(plan)  # validate reads every shard once; a run never counts
    out.print(to_yaml(cfg), end="", markup=False, highlight=False)
    kept = "".join(f"; kept {f.name}: {f.type}" for f in plan.keep_schema or [])
    summary = (f"model {plan.model.name} ({plan.model.model_class}, {plan.model.num_layers} layers, hidden "
               f"{plan.model.hidden_size}, "
               f"max_length {plan.model.max_length}); {count_of(plan.work.num_rows, 'shard')}, {rows:,} rows; outputs "
               + describe_outputs(plan.outputs, cfg, plan.model) + kept)
    if bad:
        named = "; ".join(f"{failure.source}: {failure.reason}" for failure in bad[:3])
        more = f"; and {count_of(len(bad) - 3, 'more shard')}" if len(bad) > 3 else ""
        raise StrataError(f"{count_of(len(bad), 'shard')} cannot be read ({named}{more}); the rest is fine: {summary}")
    err.print(f"ok: {summary}", markup=False, highlight=False)


def _renewal(holder) -> str:
    """When a lease was last renewed, by the holder's own clock: this host's clock is comparable only
    on the same machine."""
    from pipeline.lease import this_machine

    if holder.machine == this_machine():
        return f"lease renewed {max(time.time() - holder.renewed, 0):,.0f} s ago"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.renewed))
    return (f"lease renewed at {stamp} by that host's clock (whether it is still alive shows only by watching "
            f"its lease change: a run started now waits up to {holder.ttl:,.0f} s for that)")


@app.command()
def status(output_uri: str = typer.Argument(..., help="Output location of a run"),
           as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON")):
    """Versions, progress and totals of an output, read from its manifest."""
    from pipeline import versions
    from pipeline.lease import current_holder, surely_dead
    from pipeline.manifest import Manifest
    from pipeline.storage import Location

    manifest = Manifest(Location.from_uri(output_uri))
    run_info = manifest.read_run()
    if run_info is None:
        raise StrataError(f"{output_uri} holds no strata run (no _manifest/run.json)")
    plan = run_info["plan"]
    records = [r for r in manifest.records() if r.version == plan.get("version", 1)]
    snapshots = versions.all_snapshots(manifest.location)
    totals = snapshots[-1].counts if snapshots else {
        key: sum(getattr(r, key) for r in records) for key in ("docs", "quarantined", "blank", "tokens")}
    failures = manifest.failures()
    holder = current_holder(manifest.location)
    committed = plan.get("carried_fragments", 0) + len(records)
    planned = plan.get("fragments")  # known once every shard of the version was read
    report = {
        "output": output_uri,
        "running": None if holder is None or surely_dead(holder) else f"{holder.describe()}; {_renewal(holder)}",
        "stale_lease": None if holder is None or not surely_dead(holder) else
        f"{holder.describe()}: that run is over (killed?); the next run takes the output over",
        "current_version": snapshots[-1].version if snapshots else None,
        "fingerprint": run_info["fingerprint"],
        "model": run_info["model"].get("name"),
        "last_run_version": plan.get("version", 1),
        "fragments_planned": planned,
        "fragments_committed": committed,
        "fragments_pending": None if planned is None else max(planned - committed, 0),
        "fragments_failed": sum(1 for f in failures if f.rows is not None),
        "shards_failed": sum(1 for f in failures if f.rows is None),
        "rows_planned": plan.get("rows"),
        "shards_planned": plan.get("shards"),
        **{key: totals[key] for key in ("docs", "quarantined", "blank", "tokens")},
        "versions": [{"version": s.version, "created": s.created, "kind": s.kind, **s.counts} for s in snapshots],
        "last_run": run_info.get("summary"),
        "failures": [asdict(f) for f in failures],
    }
    if as_json:
        out.print_json(json.dumps(report))
        return
    table = Table(title=f"strata status: {output_uri}", show_header=False)
    for key, value in report.items():
        if key not in ("last_run", "failures", "versions"):
            table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value or "-"))
    out.print(table)
    if snapshots:
        out.print(versions_table(report["versions"]))
    if failures:
        failed = Table("fragment / shard", "source", "rows", "reason", title="failed in the last run (a rerun retries them)")
        for f in failures:
            failed.add_row(f.fragment, f.source, "?" if f.rows is None else f"{f.rows:,}", f.reason)
        out.print(failed)


def versions_table(rows: list[dict]) -> Table:
    columns = ("docs", "embedded", "added", "changed", "deleted", "carried", "quarantined")
    table = Table("version", Column("created (UTC)", no_wrap=True), "kind",
                  *(Column(c, justify="right") for c in columns), title="published versions (newest is current)")
    for row in rows:
        table.add_row(str(row["version"]), row["created"].replace("T", " ").rstrip("Z"), row["kind"],
                      *(f"{row[c]:,}" for c in columns))
    return table


@app.command()
def gc(output_uri: str = typer.Argument(..., help="Output location"),
       keep: int = typer.Option(..., "--keep", min=1, help="How many of the newest versions stay readable"),
       dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be removed")):
    """Remove old versions of an output and the files that only they use."""
    from pipeline import versions
    from pipeline.progress import count_of
    from pipeline.storage import Location

    done = versions.collect_garbage(Location.from_uri(output_uri), keep, dry_run)
    if not done.versions:
        err.print(f"nothing to remove: {output_uri} holds no more than {keep} versions", markup=False, highlight=False)
        return
    err.print(f"{'would remove' if dry_run else 'removed'} {'version' if len(done.versions) == 1 else 'versions'} "
              f"{', '.join(map(str, done.versions))}: {count_of(len(done.fragments), 'fragment')}, "
              f"{count_of(sum(len(r.files) for r in done.fragments), 'data file')} that no kept version uses",
              markup=False, highlight=False)


@app.command()
def index(output_uri: str = typer.Argument(..., help="Output location of a run"),
          column: str = typer.Option(..., "--column", help="The output column to index (a pooled one)"),
          to: str = typer.Option(..., "--to", help="LanceDB database: a folder or s3:// URI, created if missing"),
          table: Optional[str] = typer.Option(None, "--table", help="Table name (default: the column, plus "
                                                                    "_layerN for a layer of a stacked column)"),
          layer: Optional[int] = typer.Option(None, "--layer", help="For a stacked column: which layer, as in the "
                                                                    "config (0 = embeddings, -1 = last)"),
          metric: Optional[str] = typer.Option(None, "--metric", help="cosine | dot | l2 (default: the table's "
                                                                      "own; cosine for a new table)"),
          index_type: Optional[str] = typer.Option(None, "--index-type", help="hnsw (IVF_HNSW_SQ) | ivf_pq | none "
                                                                                "(exact search only); default: the "
                                                                                "table's own, hnsw for a new one"),
          rebuild: bool = typer.Option(False, "--rebuild", help="Build the table anew, replacing what it holds"),
          as_json: bool = typer.Option(False, "--json", help="Print what was done as JSON")):
    """Build a LanceDB vector index of an output column, or bring it up to the output's current version."""
    from pipeline.vector_index import IndexRequest, build_or_update

    request = IndexRequest(output_uri, column, to, table, layer, metric, index_type, rebuild)
    report = build_or_update(request, say=lambda line: err.print(line, markup=False, highlight=False))
    if as_json:
        out.print_json(json.dumps(report))


@app.command()
def search(index_uri: str = typer.Argument(..., help="LanceDB database made by strata index"),
           query: str = typer.Argument(..., help="Text to search for"),
           k: int = typer.Option(10, "-k", "--k", min=1, help="How many nearest documents"),
           table: Optional[str] = typer.Option(None, "--table", help="Table, when the database holds several"),
           where: Optional[str] = typer.Option(None, "--where", help="SQL filter on the kept fields, e.g. "
                                                                     "\"lang = 'en'\""),
           exact: bool = typer.Option(False, "--exact", help="Compare with every vector, bypassing the ANN index"),
           text: bool = typer.Option(True, "--text/--no-text", help="Show each result's text, read from the input"),
           as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON")):
    """Nearest documents to a text, embedded with the exact settings of the indexed vectors."""
    from pipeline.vector_index import search as search_index

    result = search_index(index_uri, [query], k, table, where, exact, with_text=text)
    hits, info = result.hits[0], result.info
    if as_json:
        out.print_json(json.dumps({"index": index_uri, "table": result.table, "column": info.column,
                                   "layer": info.layer, "metric": info.metric, "version": info.version,
                                   "query": query, "results": hits}, default=str))
        return
    score = {"cosine": "cosine", "dot": "dot", "l2": "l2 distance"}[info.metric]
    columns = [name for name in (hits[0] if hits else {}) if name not in ("rank", "score")]
    found = Table(Column("#", justify="right"), Column(score, justify="right"),
                  *(Column(name, no_wrap=name != "text", ratio=3 if name == "text" else None) for name in columns),
                  title=f"{result.table}: column {info.column}" + ("" if info.layer is None else f" layer {info.layer}")
                        + f", version {info.version}")
    for hit in hits:
        found.add_row(str(hit["rank"]), f"{hit['score']:.4f}", *(_cell(hit[name], 160 if name == "text" else 60)
                                                                 for name in columns))
    out.print(found)
    missing = sum(1 for hit in hits if text and hit["text"] is None)
    if missing:
        err.print(f"no text for {missing} of {len(hits)} results: the input ({info.identity['input']['uri']}) no "
                  "longer holds them at their rows, or cannot be read from here", markup=False, highlight=False)


def _cell(value, width: int) -> str:
    text = "" if value is None else " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command()
def probe(output_uri: str = typer.Argument(..., help="Output location of a run with per-layer vectors"),
          label: Optional[str] = typer.Option(None, "--label", help="The kept field to predict, e.g. label; "
                                                                    "without it only anisotropy is measured"),
          column: Optional[list[str]] = typer.Option(None, "--column", help="A stacked column to probe (repeatable; "
                                                                            "default: every stacked column)"),
          folds: int = typer.Option(5, "--folds", min=2, max=20, help="Stratified cross-validation folds"),
          max_docs: int = typer.Option(20000, "--max-docs", min=10, help="Probe a stratified sample of at most "
                                                                         "this many documents"),
          seed: int = typer.Option(0, "--seed", help="Seed of the sample, the folds and the anisotropy pairs"),
          report: str = typer.Option("probe-report", "--report", help="Folder for probe.json, probe.png and "
                                                                      "probe.html (local or s3://)"),
          as_json: bool = typer.Option(False, "--json", help="Print the report as JSON")):
    """Which layer suits a labeled task: a logistic-regression probe per layer, cross-validated."""
    from pipeline.probe_report import run_probe, write_report

    result = run_probe(output_uri, label, column, folds, max_docs, seed)
    written = write_report(result, report)
    if as_json:
        out.print_json(json.dumps(result))
    else:
        out.print(probe_table(result))
    best = result.get("recommended")
    verdict = f"recommended: layer {best['layer']} of column {best['column']}; " if best else ""
    err.print(f"{verdict}report: {written[2]}", markup=False, highlight=False)


def probe_table(result: dict) -> Table:
    labelled = result["label"] is not None
    scores = ("accuracy", "macro-F1", "95 % interval") if labelled else ()
    title = (f"strata probe: {result['label']!r}, {result['documents']:,} documents, {len(result['classes'])} "
             f"classes, {result['folds']}-fold" if labelled else f"strata probe: {result['documents']:,} documents")
    table = Table("column", *(Column(name, justify="right") for name in ("layer", *scores, "anisotropy")), title=title)
    best = result.get("recommended", {})
    for column in result["columns"]:
        for position, (layer, cosine) in enumerate(zip(column["layers"], column["anisotropy"])):
            cells = []
            if labelled:
                score = column["scores"][position]
                chosen = (column["column"], layer) == (best["column"], best["layer"])
                cells = [f"{score['accuracy']['mean']:.3f}", f"{score['macro_f1']['mean']:.3f}" + (" ←" if chosen else ""),
                         f"{score['macro_f1']['low']:.3f}–{score['macro_f1']['high']:.3f}"]
            table.add_row(column["column"], str(layer), *cells, f"{cosine:.3f}")
    return table


@app.command()
def bench(
    corpus: str = typer.Option(..., help="JSONL(.gz) file with id and text fields, e.g. ../shared/corpus/docs-50k.jsonl.gz"),
    docs: int = typer.Option(2000, min=1, help="Documents to embed (the corpus's first N)"),
    model: Optional[list[str]] = typer.Option(None, help="minilm (packaged), bert-base (random weights; borrows the "
                                                           "vocabulary of a folder given beside it) or a model folder; "
                                                           "repeatable (default: minilm)"),
    workload: str = typer.Option("auto", help="all-layers | sentence; auto = all-layers on GPU, sentence on CPU"),
    method: Optional[list[str]] = typer.Option(None, help="loop | st_encode | stage | e2e; repeatable (default: all four)"),
    loop_batch: int = typer.Option(64, min=1, help="Batch size of the plain-transformers loop"),
    token_budget: int = typer.Option(16384, min=2, help="strata's batching.token_budget"),
    fragment_docs: int = typer.Option(4096, min=1, help="strata's batching.fragment_docs"),
    max_length: Optional[int] = typer.Option(None, min=2, help="Tokens per sequence (default: the model's own limit)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | sim:RATE[,RATE...]: a simulated device of RATE "
                                             "tokens/s; measures host cost per step and the device's busy share"),
    busy_docs: int = typer.Option(2000, min=0, help="Documents of each whole run against a simulated device (in 8 "
                                                    "fragments); 0 = the host cost table only"),
    try_: Optional[list[str]] = typer.Option(None, "--try", help="Also run the stage with a device option, NAME=VALUE: "
                                                                  "compile=MODE, attention=IMPL, pass_overhead=TOKENS, "
                                                                  "token_budget=TOKENS; repeatable"),
    profile: bool = typer.Option(False, help="Also profile strata's stage: time by operator kind"),
    memory_scale: int = typer.Option(0, min=0, help="Also compare peak host memory of strata run on --docs and "
                                                     "this many times more documents (first model only)"),
    json_path: str = typer.Option("out/bench.json", "--json", help="Where to write the result as JSON"),
):
    """Throughput of strata next to a plain transformers loop and sentence-transformers, in one run."""
    from pathlib import Path

    from pipeline import bench as bench_module

    for given, known in ((method or [], bench_module.METHODS), ([workload], ("auto", *bench_module.WORKLOADS))):
        for value in given:
            if value not in known:
                kind = "method" if known is bench_module.METHODS else "workload"
                raise StrataError(f"unknown {kind} {value!r}; choose from {', '.join(known)}")
    options = bench_module.BenchOptions(
        corpus=corpus, docs=docs, models=tuple(model or ("minilm",)), workload=workload,
        methods=tuple(method or bench_module.METHODS), loop_batch=loop_batch, token_budget=token_budget,
        fragment_docs=fragment_docs, max_length=max_length, device=device, profile=profile, memory_scale=memory_scale,
        busy_docs=busy_docs, tries=tuple(try_ or ()))
    result = bench_module.run_bench(options, report=lambda m: err.print(
        f"  {m.model} {m.method}: {m.tokens_per_s:,.0f} tokens/s {m.note}", markup=False, highlight=False))
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=2))
    if result["results"]:
        out.print(bench_table(result))
    for name, facts in result["models"].items():
        if "feed" in facts:
            out.print(feed_table(name, facts["feed"]))
            if "busy" in facts["feed"]:  # not with --busy-docs 0 or without Ray
                out.print(busy_table(name, facts["feed"]))
        if "memory" in facts:
            runs = facts["memory"]["runs"]
            err.print(f"  {name} host memory (peak PSS of strata run): {runs[0]['docs']:,} docs "
                      f"{runs[0]['peak_pss_bytes'] / 2**20:,.0f} MiB, {runs[1]['docs']:,} docs "
                      f"{runs[1]['peak_pss_bytes'] / 2**20:,.0f} MiB, ratio {facts['memory']['ratio']:.2f}",
                      markup=False, highlight=False)
    err.print(f"written to {json_path}")
    wrong = [r for r in result["results"] if r["vectors_match"] is False]
    if wrong:
        raise StrataError(f"{wrong[0]['model']} {wrong[0]['method']}: vectors differ from the loop's (min cosine "
                          f"{wrong[0]['min_cosine']:.5f} < {result['cosine_floor']}); its speed is not comparable")


@app.command()
def submit(config: str = typer.Argument(..., help="YAML config file"), overrides: Optional[list[str]] = SetOption,
           address: Optional[str] = AddressOption,
           follow: bool = typer.Option(False, "--follow", help="Stream the job's log and exit with its outcome"),
           ship_code: bool = typer.Option(False, "--ship-code", help="Upload this strata package with the job, for "
                                                                     "images with the dependencies but another strata")):
    """Run a config as a Ray job on a cluster; prints the job id."""
    from pathlib import Path

    from pipeline import cluster

    cfg = cluster.for_cluster(load_config(config, overrides))  # a bad config fails before the cluster is asked
    client = cluster.connect(address)
    job_id = cluster.submit(client, cfg, Path(config).stem, ship_code=ship_code)
    out.print(job_id, markup=False, highlight=False)
    for key in cluster.local_paths(cfg):
        err.print(f"note: {key} is a local path; every node of the cluster must see it (a shared disk)",
                  markup=False, highlight=False)
    if not follow:
        err.print(f"follow it with: strata jobs logs {job_id} --follow; stop it with: strata jobs stop {job_id}",
                  markup=False, highlight=False)
        return
    _follow(client, job_id)


def _follow(client, job_id: str) -> None:
    from pipeline import cluster

    try:
        job = cluster.follow(client, job_id, lambda text: print(text, end="", flush=True))
    except KeyboardInterrupt:
        err.print(f"stopped following; job {job_id} goes on (strata jobs stop {job_id} stops it)")
        raise SystemExit(130) from None
    _report_outcome(job)


def _report_outcome(job) -> None:
    seconds = "" if job.seconds is None else f" after {job.seconds:,.0f} s"
    if job.status != "SUCCEEDED":
        lines = job.message.strip().splitlines()
        # Ray's message quotes the job's last log lines: strata's own error line says it best
        said = [line.strip() for line in lines if line.startswith("error: ")]
        reason = said[-1] if said else lines[0] if lines else "no message"
        raise StrataError(f"job {job.job_id} {job.status.lower()}{seconds}: {reason}")
    err.print(f"job {job.job_id} succeeded{seconds}", markup=False, highlight=False)


@jobs_app.command("list")
def jobs_list(address: Optional[str] = AddressOption,
              as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON")):
    """strata's jobs on the cluster, newest first."""
    from pipeline import cluster

    jobs = cluster.list_jobs(cluster.connect(address))
    if as_json:
        out.print_json(json.dumps([asdict(job) for job in jobs]))
        return
    table = Table(Column("job id", no_wrap=True), Column("status", no_wrap=True), "output",
                  Column("started (UTC)", no_wrap=True), Column("seconds", justify="right"), title="strata jobs")
    for job in jobs:
        started = "" if job.start_time is None else time.strftime("%m-%d %H:%M", time.gmtime(job.start_time))
        table.add_row(job.job_id, job.status, job.output, started, "" if job.seconds is None else f"{job.seconds:,.0f}")
    out.print(table)


@jobs_app.command("show")
def jobs_show(job_id: str = typer.Argument(..., help="Job id, as submit printed it"), address: Optional[str] = AddressOption):
    """A job's state, entrypoint and message, as JSON."""
    from pipeline import cluster

    out.print_json(json.dumps(asdict(cluster.show(cluster.connect(address), job_id))))


@jobs_app.command("logs")
def jobs_logs(job_id: str = typer.Argument(..., help="Job id"), address: Optional[str] = AddressOption,
              follow: bool = typer.Option(False, "--follow", help="Keep streaming until the job ends; exit with its outcome")):
    """A job's log (its driver's output: progress lines and the run summary)."""
    from pipeline import cluster

    client = cluster.connect(address)
    if follow:
        _follow(client, job_id)
    else:
        print(cluster.logs(client, job_id), end="")


@jobs_app.command("stop")
def jobs_stop(job_id: str = typer.Argument(..., help="Job id"), address: Optional[str] = AddressOption):
    """Stop a job and wait until it has stopped; committed fragments are kept, a resubmit resumes."""
    from pipeline import cluster

    job = cluster.stop(cluster.connect(address), job_id)
    err.print(f"job {job.job_id}: {job.status.lower()}", markup=False, highlight=False)


def feed_table(model: str, feed: dict) -> Table:
    """CPU-seconds per million tokens by step, and what 2 and 16 cores can feed."""
    per_million = feed["cpu_s_per_million_tokens"]
    cost = feed["host_cost"]
    table = Table(title=f"host cost, {model}: {cost['docs']:,} docs in {cost['shards']} shards, {cost['fragments']} "
                        f"fragments, {cost['tokens']:,} tokens (CPU-seconds per million tokens)", title_justify="left")
    table.add_column("step")
    table.add_column("CPU-s / M tokens", justify="right")
    table.add_column("share", justify="right")
    total = feed["total_cpu_s_per_million_tokens"]
    for step, seconds in per_million.items():
        table.add_row(step, f"{seconds:.2f}", f"{seconds / total:.0%}")
    table.add_row("total", f"{total:.2f}", "100%", style="bold")
    for cores, rate in feed["feed_tokens_per_s"].items():
        table.add_row(f"feeds, {cores} cores", f"{rate:,.0f} tokens/s", "")
    run = feed.get("whole_run")
    if run:
        table.add_row(f"whole run here, {run['tokens']:,} tokens", f"{run['tokens_per_s']:,.0f} tokens/s", "")
        table.add_row("  its CPU-s / M tokens, all in", f"{run['cpu_s_per_million_tokens_all_in']:.2f}", "")
        from pipeline.bench_feed import fixed_cpu_s

        table.add_row("  of which fixed (start-up), CPU-s", f"{fixed_cpu_s(feed):.1f}", "")
    return table


def busy_table(model: str, feed: dict) -> Table:
    """The simulated device's busy share at each rate, one fragment at a time vs two."""
    table = Table(title=f"simulated device, {model}: busy share (time computing / first pass to last)",
                  title_justify="left")
    for column in ("device tokens/s", "fragments at once", "busy share", "e2e tokens/s"):
        table.add_column(column, justify="right")
    for row in feed["busy"]:
        table.add_row(f"{row['tokens_per_s_simulated']:,.0f}", str(row["fragments_at_once"]),
                      f"{row['busy_share']:.3f}", f"{row['e2e_tokens_per_s']:,.0f}")
    return table


def bench_table(result: dict) -> Table:
    table = Table("model", "method", "tokens/s", "× loop", "padding", "min cosine vs loop", "note",
                  title=f"strata bench: {result['docs']:,} docs, workload {result['workload']['name']}, "
                        f"{result['environment'].get('gpu', result['environment']['device'])}")
    for r in result["results"]:
        table.add_row(r["model"], r["method"], f"{r['tokens_per_s']:,.0f}",
                      "" if r["ratio_to_loop"] is None else f"{r['ratio_to_loop']:.2f}",
                      "" if r["padding_share"] is None else f"{r['padding_share']:.1%}",
                      "" if r["min_cosine"] is None else f"{r['min_cosine']:.5f}" + ("" if r["vectors_match"] else " ✗"),
                      r["note"])
    return table


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local folders, never a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray's C++ core would turn SIGTERM into an abort with a stack dump (read when ray is imported):
    # a stopped run unwinds instead, gives its lease back and exits 143, as after Ctrl-C
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _interrupt)
    sys.unraisablehook = _quiet_stops
    # aiohttp's connection resets inside s3fs's event loop surface as asyncio's "Task exception was
    # never retrieved" with a traceback each; the request that failed is retried or reported by strata
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    errors.clear_stops()
    try:
        code = app(standalone_mode=False)
    except StrataError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except Terminated:
        err.print("terminated (SIGTERM); committed work is kept: rerun the same command to resume", markup=False,
                  highlight=False)
        sys.exit(143)
    except typer.TyperException as exc:  # usage errors (typer's own click) arrive here in non-standalone mode
        exc.show()
        sys.exit(exc.exit_code)
    except OSError as exc:
        if not _stdout_failed(exc):
            raise
        err.print(f"error: cannot write to standard output: {exc.strerror or exc}", markup=False, highlight=False)
        sys.exit(1)
    finally:  # a stop belongs to this command (the process may run another: tests)
        errors.clear_stops()
    if code == 130:  # typer turns Ctrl-C into this code when it does not exit itself
        err.print("interrupted; committed work is kept: rerun the same command to resume", markup=False,
                  highlight=False)
    if isinstance(code, int) and code:
        sys.exit(code)


def _stdout_failed(exc: OSError) -> bool:
    """Whether an OSError came from writing to standard output (a full disk, a closed pipe)."""
    import traceback

    return any(frame.filename.endswith(("rich/console.py", "rich/file_proxy.py")) or frame.name == "print"
               for frame in traceback.extract_tb(exc.__traceback__))


def _quiet_stops(unraisable) -> None:
    """A stop that lands in a finalizer (a weakref callback, `__del__`) cannot unwind from there;
    Python would print it as "Exception ignored ... Traceback". The run loop raises it again
    (`errors.raise_if_stopped`), so say nothing here; anything else is printed as usual."""
    if not isinstance(unraisable.exc_value, (Terminated, KeyboardInterrupt)):
        sys.__unraisablehook__(unraisable)


def _terminate(signum, frame) -> None:
    errors.stop(Terminated)


def _interrupt(signum, frame) -> None:
    errors.stop(KeyboardInterrupt)


if __name__ == "__main__":
    main()
