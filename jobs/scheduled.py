"""Entrypoint of scheduled runs (KubeRay RayCronJob, infra/kuberay/raycronjob.yaml):
`python jobs/scheduled.py CONFIG.yaml [--set k=v ...]`.

Each tick embeds what the output lacks: shards that are new since the last run, and fragments
an earlier run left unfinished (a shard edited under committed fragments is refused, see the
README's resume section). A tick that finds another run still holding the output exits 0 at
once, so a slow run never overlaps the next one.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.argv = ["strata", "run", "--if-free", *sys.argv[1:]]
    main()
