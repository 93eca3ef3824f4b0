"""Data generation on Ray Data (``--engine ray`` of ``ramp generate``, ``cot build`` and ``selfevolve iterate``).

Why: the paper generated 10M trajectories; one process tree on one machine does not get there. Ray (installed with
verl) brings an engine made for shard -> map -> write with checkpointed resume, on one machine or a cluster, so we
write no scheduler of our own. The asyncio engine of each command stays the default for small runs; both run the
same per-item code and export the same files.

Modules (generic: nothing here knows a command; this package sits on the base floor of docs/architecture.md):
  ``engine``      Ray start-up (local unless ``RAY_ADDRESS``), input parquet shards, the map -> write job with Ray
                  Data's checkpointing, the failure side files, the export (committed files only, one row per id,
                  sorted by id), progress to console and W&B
  ``budget``      the endpoint budget: requests in flight and requests/s per LLM endpoint, over all workers
  ``command``     what every command's job shares: the work directory, the summary's ``ray`` section, the
                  processors' helpers (LLM counts, an item's exception as a failure)

Each command's processor (its per-item code, wrapped for a Ray Data worker) and its job (input, processor, output
files, summary) live with the command: ``masksearch_rl.ramp.ray_job``, ``masksearch_rl.cot.ray_job``,
``masksearch_rl.selfevolve.ray_job``.
"""
