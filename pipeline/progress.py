"""What a person watching a run sees: live progress (rows done/total, tokens/s, ETA) and the summary.

On a terminal this is a rich progress bar; in a log (CI, a cluster job) it is one plain line
per fragment at most every few seconds, so logs stay readable.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pipeline.manifest import CommitRecord

LOG_EVERY_SECONDS = 5.0


class RunProgress:
    def __init__(self, console: Console, total_rows: int, done_rows: int):
        self.console = console
        self.total, self.done, self.done_before = total_rows, done_rows, done_rows
        self.tokens = 0
        self.started = time.monotonic()
        self.last_log = 0.0
        self.bar = None
        if console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]embedding"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=console,
            )
            self.task = self.bar.add_task("embed", total=total_rows, completed=done_rows, rate="")

    def __enter__(self) -> "RunProgress":
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def update(self, record: CommitRecord) -> None:
        self.done += record.rows
        self.tokens += record.embedded_tokens
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = f"{self.tokens / elapsed:,.0f} tokens/s"
        if self.bar:
            self.bar.update(self.task, completed=self.done, rate=rate)
        elif time.monotonic() - self.last_log >= LOG_EVERY_SECONDS or self.done >= self.total:
            self.last_log = time.monotonic()
            done_here = self.done - self.done_before
            eta = (self.total - self.done) * elapsed / done_here if done_here else float("nan")
            self.console.print(
                f"progress: {self.done:,}/{self.total:,} rows, {rate}, {elapsed:,.0f} s elapsed, ETA {eta:,.0f} s"
            )


def count_of(n: int, noun: str) -> str:
    """A count with its noun for messages: 1 shard, 2 shards."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def summary_table(summary: dict) -> Table:
    table = Table(title="strata run summary", show_header=False)
    labels = [
        ("version", "output version"),
        ("fragments", "fragments (done / planned)"),
        ("docs", "documents in the version"),
        ("docs_this_run", "documents embedded (this run)"),
        ("added", "added since the last version"),
        ("changed", "changed since the last version"),
        ("deleted", "deleted since the last version"),
        ("carried", "unchanged, carried forward"),
        ("quarantined", "documents quarantined"),
        ("blank", "blank lines skipped"),
        ("failed_fragments", "fragments failed (this run)"),
        ("failed_shards", "shards unreadable (this run)"),
        ("tokens", "tokens"),
        ("tokens_per_s", "tokens/s (this run)"),
        ("docs_per_s", "docs/s (this run)"),
        ("padding_share", "padding share"),
        ("wall_seconds", "wall time (s, this run)"),
    ]
    for key, label in labels:
        value = summary.get(key)
        if (key.startswith("failed_") and not value) or value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.1%}" if key == "padding_share" else f"{value:,.1f}"
        elif isinstance(value, int):
            value = f"{value:,}"
        table.add_row(label, str(value))
    return table
