"""What a person watching a run sees: live progress (rows done/total, tokens/s, ETA) and the summary.

On a terminal this is a rich progress bar; in a log (CI, a cluster job) it is one plain line
per fragment at most every few seconds, so logs stay readable.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pipeline.manifest import CommitRecord

LOG_EVERY_SECONDS = 5.0


class RunProgress:
    """Progress by input bytes: a shard's bytes count as done when its last fragment commits,
    and the rows read so far of shards still open count at the bytes per row of the finished
    ones, each at most up to its own size (no row count is known before a shard is read)."""

    def __init__(self, console: Console, total_bytes: int, shards: int):
        self.console = console
        self.total_bytes, self.shards = total_bytes, shards
        self.rows = self.tokens = self.shards_done = self.bytes_done = self.rows_done = 0
        self.open: dict[str, tuple[int, int]] = {}  # source -> (rows committed this run, size) of open shards
        self.started = time.monotonic()
        self.last_log = 0.0
        self.bar = None
        if console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]embedding"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("{task.fields[counts]}"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), console=console,
            )
            self.task = self.bar.add_task("embed", total=max(total_bytes, 1), counts="", rate="")

    def __enter__(self) -> "RunProgress":
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def update(self, record: CommitRecord, shard_size: int) -> None:
        self.rows += record.rows
        self.tokens += record.embedded_tokens
        rows, _ = self.open.pop(record.source, (0, shard_size))
        if record.last:
            self.shards_done += 1
            self.bytes_done += shard_size
            self.rows_done += rows + record.rows
        else:
            self.open[record.source] = (rows + record.rows, shard_size)
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = f"{self.tokens / elapsed:,.0f} tokens/s"
        counts = f"{self.shards_done:,}/{self.shards:,} shards, {self.rows:,} rows"
        done = self.estimate()
        if self.bar:
            self.bar.update(self.task, completed=done, counts=counts, rate=rate)
        elif time.monotonic() - self.last_log >= LOG_EVERY_SECONDS or self.shards_done >= self.shards:
            self.last_log = time.monotonic()
            share = done / self.total_bytes if self.total_bytes else 1.0
            eta = f"{elapsed * (1 - share) / share:,.0f} s" if share > 0 else "?"
            self.console.print(f"progress: {counts} ({share:.0%} of {byte_size(self.total_bytes)}), {rate}, "
                               f"{elapsed:,.0f} s elapsed, ETA {eta}")

    def estimate(self) -> float:
        """Input bytes done: finished shards whole, open ones by their rows (never past 99 % of
        their size, and never the whole input while a shard is open)."""
        per_row = self.bytes_done / self.rows_done if self.rows_done else 0.0
        done = self.bytes_done + sum(min(rows * per_row, 0.99 * size) for rows, size in self.open.values())
        return min(done, self.total_bytes * (0.999 if self.shards_done < self.shards else 1.0))


def byte_size(size: float) -> str:
    """Bytes for people: 812 bytes, 1.4 MB, 2.1 GB (powers of 1000)."""
    if size < 1000:
        return f"{int(size):,} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000 or unit == "TB":
            return f"{size:,.1f} {unit}"
    return ""


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
        ("truncated", "documents cut at max_length"),
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
