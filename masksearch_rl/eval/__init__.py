"""Evaluation harness: the paper's QA benchmarks, scored with the reward's own answer matching.

Public API::

    load_benchmark(path, name=None, limit=None, skip_bad=False) -> list[QAItem]     # loaders.py
    run_eval(EvalConfig(datasets=[("hotpotqa", path)], out_dir=..., policy=PolicyConfig(...))) -> dict  # runner.py
    write_report(runs, out_dir) -> paths       # Table 2 as Markdown/CSV/JSON + PNG plots (report.py)
    export_parquet(items_by_dataset, out_dir, split="val") -> dict                   # verl val parquet (export.py)
    HFPolicy(model_dir)                        # a local HF model as a PolicyClient (hf_policy.py)
    log_generation_dumps(dump_dir, tracker)    # verl's validation dumps -> W&B trajectory tables (trajectories.py)

Commands: ``masksearch-rl eval run|report|export|check|log-generations`` (cli.py). See docs/eval.md.
"""
