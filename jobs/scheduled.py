"""Entrypoint of scheduled runs (KubeRay RayCronJob, infra/kuberay/raycronjob.yaml):
`python jobs/scheduled.py CONFIG.yaml [--set k=v ...]`.

Each tick is an incremental run (`strata run --incremental`): it compares the input with the
output's current version and publishes a new version that embeds only the added and changed
documents, carries the unchanged ones and drops the deleted ones; a tick with no changes does
nothing, and one whose predecessor died finishes that version first. A tick that finds another
run still holding the output exits 0 at once, so a slow run never overlaps the next one.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.argv = ["strata", "run", "--if-free", "--incremental", *sys.argv[1:]]
    main()
