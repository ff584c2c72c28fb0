"""Cluster entrypoint (Ray Jobs / KubeRay RayJob): `python jobs/embed.py CONFIG.yaml [--set k=v ...]`.

Inside a Ray job `ray.init()` joins the job's cluster, so this is `strata run` on the cluster;
all state lives in the output location, so a retried job resumes where the last one stopped.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.argv = ["strata", "run", *sys.argv[1:]]
    main()
