"""Planning cost at 10^5..10^7 shards: time and driver memory from a listing to the first Ray input block.

What is measured is everything the driver of `strata run` does with a listing before Ray Data
gets its input: turning listing pages into the Arrow shard table (`sources.select_listing`:
format and compression from the names, hidden and non-corpus files left out, sorted by source),
choosing what to read (`runner.to_read`, with no commit records: a first run) and cutting the
input blocks (`ray_pipeline.input_blocks`). Not measured: the store's LIST requests themselves
(1,000 keys a request on S3; see docs/DESIGN-NOTES.md for their cost).

The listing is synthetic, made here page by page as a paginated object-store LIST hands it over
(100,000 entries a page): names `corpus/<5-digit folder>/part-<8-digit n>.jsonl.gz`, 1,000 per
folder, sizes 50-500 KB from a fixed random generator (a 1-billion-document corpus of ~100
documents per shard), versions `<size>:"<32-hex etag>"`.
Each size runs in a fresh Python process so the peak RSS (`ru_maxrss`) is its own. The time
includes making the synthetic names in Python, as a real listing's Python objects would be made.

    .venv/bin/python bench/planning.py                 # 100k and 1M, extrapolated to 10M
    .venv/bin/python bench/planning.py --sizes 100000 1000000 10000000   # also measure 10M

Target (issue "start embedding in seconds at any corpus size"): 10M shards planned in <= 60 s
with <= 2 GB of driver memory.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

PAGE = 100_000
TARGET_SECONDS, TARGET_BYTES = 60.0, 2 << 30


def pages(n: int):
    import random

    rng = random.Random(20)
    for first in range(0, n, PAGE):
        count = min(PAGE, n - first)
        names = [f"corpus/{i // 1000:05d}/part-{i:08d}.jsonl.gz" for i in range(first, first + count)]
        sizes = [rng.randrange(50_000, 500_000) for _ in range(count)]
        versions = [f'{size}:"{rng.getrandbits(128):032x}"' for size in sizes]
        yield [names, sizes, versions, ["file"] * count]


def measure(n: int) -> dict:
    """Runs in its own process: seconds and peak RSS of planning n shards."""
    from pipeline.ray_pipeline import input_blocks
    from pipeline.runner import to_read
    from pipeline.sources import select_listing

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    table = select_listing(pages(n), "corpus")
    listed = time.perf_counter()
    todo = to_read(table, [])
    blocks = input_blocks(todo)
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert table.num_rows == n and todo.num_rows == n
    return {"shards": n, "seconds": round(done - started, 2), "listing_seconds": round(listed - started, 2),
            "blocks": len(blocks), "table_bytes": table.nbytes, "peak_rss_bytes": peak,
            "rss_before_bytes": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    points = []
    for n in args.sizes:
        child = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=True)
        point = json.loads(child.stdout.strip().splitlines()[-1])
        points.append(point)
        print(f"{n:>12,} shards: {point['seconds']:7.2f} s ({point['listing_seconds']:.2f} s listing -> Arrow), "
              f"peak RSS {point['peak_rss_bytes'] / 2**20:7.0f} MiB (interpreter and imports "
              f"{point['rss_before_bytes'] / 2**20:.0f} MiB), shard table {point['table_bytes'] / 2**20:.0f} MiB, "
              f"{point['blocks']:,} input blocks")
    a, b = points[0], points[-1]
    ratio = math.log(b["shards"] / a["shards"])
    time_exp = math.log(b["seconds"] / a["seconds"]) / ratio
    extra = b["peak_rss_bytes"] - b["rss_before_bytes"]
    mem_per_shard = (extra - (a["peak_rss_bytes"] - a["rss_before_bytes"])) / (b["shards"] - a["shards"])
    target = 10_000_000
    seconds = b["seconds"] * (target / b["shards"]) ** time_exp
    memory = b["peak_rss_bytes"] + mem_per_shard * (target - b["shards"])
    print(f"growth exponent of time: {time_exp:.2f}; memory per shard: {mem_per_shard:.0f} bytes")
    print(f"10,000,000 shards (extrapolated from {a['shards']:,} and {b['shards']:,}): {seconds:.1f} s "
          f"(target <= {TARGET_SECONDS:.0f} s: {'met' if seconds <= TARGET_SECONDS else 'NOT met'}), "
          f"{memory / 2**30:.2f} GiB (target <= 2 GiB: {'met' if memory <= TARGET_BYTES else 'NOT met'})")
    print(json.dumps({"points": points, "time_exponent": round(time_exp, 3), "memory_per_shard_bytes": round(mem_per_shard),
                      "extrapolated_10m": {"seconds": round(seconds, 1), "peak_rss_bytes": round(memory)}}))


if __name__ == "__main__":
    main()
