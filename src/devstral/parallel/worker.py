"""Entry point of a tensor-parallel rank that rank 0 spawned (parallel/launch.py)."""

import sys

from devstral.parallel.launch import worker_main

if __name__ == "__main__":
    sys.exit(worker_main())
