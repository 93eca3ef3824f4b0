"""Data generation on Ray Data (``--engine ray`` of ``ramp generate``, ``cot build`` and ``selfevolve iterate``).

Why: the paper generated 10M trajectories; one process tree on one machine does not get there. Ray (installed with
verl) brings an engine made for shard -> map -> write with checkpointed resume, on one machine or a cluster, so we
write no scheduler of our own. The asyncio engine of each command stays the default for small runs; both run the
same per-item code and export the same files.

Modules:
  ``engine``      Ray start-up (local unless ``RAY_ADDRESS``), input parquet shards, the map -> write job with Ray
                  Data's checkpointing, the failure side files, the export (committed files only, one row per id,
                  sorted by id), progress to console and W&B
  ``budget``      the endpoint budget: requests in flight and requests/s per LLM endpoint, over all workers
  ``processors``  the per-item code of each command, wrapped for a Ray Data worker
  ``jobs``        what each command does around the engine: its input, its processor, its output files, its summary
"""
