"""``masksearch-rl eval run|report|export|check|log-generations``: the evaluation harness's commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from envs.search_client import DEFAULT_MAX_INFO_TOKENS, DEFAULT_TOPK

eval_app = typer.Typer(help="Evaluate search agents on QA benchmarks; Table 2; verl val parquet.",
                       no_args_is_help=True)

DATA_HELP = (
    "Benchmark file, as name=path or a path named after its benchmark (hotpotqa_500.jsonl); repeat for several. "
    "Names: hotpotqa fanoutqa musique 2wiki bamboogle freshqa nq triviaqa popqa."
)


def _tracking(project: Optional[str], entity: Optional[str], name: Optional[str], group: Optional[str],
              mode: Optional[str], wandb_dir: Optional[str]):
    from masksearch_rl.tracking import TrackingConfig

    return TrackingConfig(project=project, entity=entity, name=name, group=group, mode=mode, dir=wandb_dir)


def _specs(data: list[str]) -> list[tuple[str, Path]]:
    from masksearch_rl.eval.loaders import BenchmarkFormatError, parse_data_spec

    try:
        return [(bench.name, path) for bench, path in map(parse_data_spec, data)]
    except BenchmarkFormatError as err:
        raise typer.BadParameter(str(err)) from err


@eval_app.command("run")
def run_command(
    data: list[str] = typer.Option(..., "--data", help=DATA_HELP),
    out: Path = typer.Option(..., "--out", help="Run directory: predictions.jsonl (resumable), results.json, "
                             "table.md/csv/json, plots/."),
    method: str = typer.Option("policy", "--method", help="Row name in the results table."),
    policy: str = typer.Option("chat", "--policy", help="chat (vLLM/SGLang) | chat-turns (any chat API) | "
                               "completions | hf (local model, no server)"),
    base_url: str = typer.Option("http://127.0.0.1:8001/v1", "--base-url", help="Policy endpoint (OpenAI-compatible)."),
    model: str = typer.Option("policy", "--model", help="Served model name."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="NAME of the env variable with the key."),
    hf_model: Optional[str] = typer.Option(None, "--hf-model", help="--policy hf: model directory."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="--policy completions: tokenizer directory."),
    device: str = typer.Option("cpu", "--device", help="--policy hf: torch device."),
    temperature: float = typer.Option(0.0, "--temperature"),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", help="Tokens per policy turn."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds per policy request."),
    max_retries: int = typer.Option(3, "--max-retries"),
    retriever_url: Optional[str] = typer.Option(None, "--retriever-url", help="Our retrieval server (default "
                                                "http://127.0.0.1:8000)."),
    index_dir: Optional[str] = typer.Option(None, "--index", help="Search a local index directly (no server)."),
    web: Optional[str] = typer.Option(None, "--web", help="Web search instead: serper | serpapi | google_cse "
                                      "(key from $SERPER_API_KEY ...)."),
    topk: int = typer.Option(DEFAULT_TOPK, "--topk"),
    max_info_tokens: int = typer.Option(DEFAULT_MAX_INFO_TOKENS, "--max-info-tokens"),
    max_turns: int = typer.Option(4, "--max-turns", help="Searches answered per question."),
    concurrency: int = typer.Option(32, "--concurrency", help="Episodes in flight."),
    limit: Optional[int] = typer.Option(None, "--limit", help="First N questions of each benchmark."),
    skip_bad: bool = typer.Option(False, "--skip-bad/--strict", help="Skip malformed records (counted) or fail."),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="Also grade answers with a model judge."),
    judge_model: str = typer.Option("Qwen/Qwen2.5-72B-Instruct", "--judge-model"),
    judge_key_env: str = typer.Option("OPENAI_API_KEY", "--judge-api-key-env"),
    wandb_project: Optional[str] = typer.Option(None, "--wandb-project", help="Log to W&B (key from $WANDB_API_KEY; "
                                                "WANDB_MODE=offline works without network)."),
    wandb_entity: Optional[str] = typer.Option(None, "--wandb-entity"),
    wandb_name: Optional[str] = typer.Option(None, "--wandb-name"),
    wandb_group: Optional[str] = typer.Option(None, "--wandb-group"),
    wandb_mode: Optional[str] = typer.Option(None, "--wandb-mode", help="online | offline | disabled"),
    wandb_dir: Optional[str] = typer.Option(None, "--wandb-dir"),
    plots: bool = typer.Option(True, "--plots/--no-plots"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    force: bool = typer.Option(False, "--force", help="Resume into --out although its predictions were made with "
                               "another policy, search or judge setting (they are kept; the changes are recorded)."),
) -> None:
    """Run the agent on benchmark questions and score it (resumable: re-run the same command after a kill)."""
    from masksearch_rl.eval.loaders import BenchmarkFormatError
    from masksearch_rl.eval.runner import EvalConfig, PolicyConfig, run_eval

    from envs.search_client import search_backend_config

    try:
        backend = search_backend_config(retriever_url, index_dir, web)
    except ValueError as err:
        raise typer.BadParameter("choose one of --retriever-url, --index, --web") from err
    try:
        config = EvalConfig(
            datasets=_specs(data),
            out_dir=out,
            method=method,
            policy=PolicyConfig(
                kind=policy,
                llm={"base_url": base_url, "model": model, "api_key_env": api_key_env, "timeout_s": timeout,
                     "max_retries": max_retries, "concurrency": concurrency, "max_tokens": max_new_tokens},
                model=hf_model, tokenizer=tokenizer, device=device, max_new_tokens=max_new_tokens,
                temperature=temperature,
            ),
            search={"backend": backend, "topk": topk, "max_info_tokens": max_info_tokens},
            max_turns=max_turns,
            concurrency=concurrency,
            limit=limit,
            skip_bad=skip_bad,
            judge={"base_url": judge_url, "model": judge_model, "api_key_env": judge_key_env} if judge_url else None,
            tracking=_tracking(wandb_project, wandb_entity, wandb_name, wandb_group, wandb_mode, wandb_dir),
            plots=plots,
            progress=progress,
            force=force,
        )
        results = run_eval(config)
    except (ValueError, FileNotFoundError, BenchmarkFormatError) as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo(Path(results["report"]["markdown"]).read_text(encoding="utf-8"))
    typer.echo(json.dumps({"run": results["run"], "missing": results["missing"], **results["report"]}, indent=2))
    if not results["complete"]:
        typer.echo("some questions failed at the policy endpoint; re-run the same command to finish them", err=True)
        raise typer.Exit(code=1)


@eval_app.command("report")
def report_command(
    results: list[Path] = typer.Option(..., "--results", help="results.json files or run directories, one per row."),
    out: Path = typer.Option(..., "--out", help="Writes table.md, table.csv, table.json, plots/."),
    plots: bool = typer.Option(True, "--plots/--no-plots"),
) -> None:
    """Merge several runs into one Table 2 (a row per run)."""
    from masksearch_rl.eval.report import load_results, write_report

    try:
        runs = [load_results(path) for path in results]
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    paths = write_report(runs, out, plots=plots)
    typer.echo(Path(paths["markdown"]).read_text(encoding="utf-8"))


@eval_app.command("export")
def export_command(
    data: list[str] = typer.Option(..., "--data", help=DATA_HELP),
    out_dir: Path = typer.Option(..., "--out-dir", help="Writes <benchmark>/<split>.parquet and "
                                 "benchmarks_<split>.parquet."),
    split: str = typer.Option("val", "--split", help="val (verl validation) or train (e.g. Stage II HotpotQA)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="First N questions of each benchmark."),
    skip_bad: bool = typer.Option(False, "--skip-bad/--strict"),
    agent_name: Optional[str] = typer.Option(None, "--agent-name", help="Row agent_name (default: our tag loop)."),
) -> None:
    """Benchmarks -> verl RL parquet (data.val_files for trainer.test_freq, or Stage II train files)."""
    from envs.prompts import TAG_AGENT_NAME
    from masksearch_rl.eval.export import export_parquet
    from masksearch_rl.eval.loaders import BenchmarkFormatError, load_benchmark

    try:
        items = {}
        for name, path in _specs(data):
            loaded = load_benchmark(path, name, limit=limit, skip_bad=skip_bad)
            items[loaded[0].dataset] = loaded
        result = export_parquet(items, out_dir, split=split, agent_name=agent_name or TAG_AGENT_NAME)
    except (ValueError, FileNotFoundError, BenchmarkFormatError) as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo(json.dumps(result, indent=2))


@eval_app.command("check")
def check_command(data: list[str] = typer.Option(..., "--data", help=DATA_HELP)) -> None:
    """Read benchmark files strictly and print counts and a sample (first error names file, line and field)."""
    from masksearch_rl.eval.loaders import BenchmarkFormatError, LoadReport, load_benchmark

    for name, path in _specs(data):
        report = LoadReport()
        try:
            items = load_benchmark(path, name, report=report)
        except BenchmarkFormatError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=1) from err
        sample = items[0]
        typer.echo(json.dumps({"benchmark": name, "file": str(path), "items": len(items), "excluded": report.excluded,
                               "duplicates": report.duplicates,
                               "sample": {"id": sample.id, "question": sample.question,
                                          "answers": list(sample.answers)}}, ensure_ascii=False))


@eval_app.command("log-generations")
def log_generations_command(
    dump_dir: Path = typer.Option(..., "--dump-dir", help="verl's trainer.validation_data_dir (<step>.jsonl files)."),
    wandb_project: str = typer.Option("masksearch-rl", "--wandb-project"),
    wandb_name: Optional[str] = typer.Option(None, "--wandb-name", help="Run name (e.g. the experiment's)."),
    wandb_group: Optional[str] = typer.Option(None, "--wandb-group"),
    wandb_entity: Optional[str] = typer.Option(None, "--wandb-entity"),
    wandb_mode: Optional[str] = typer.Option(None, "--wandb-mode", help="online | offline | disabled"),
    wandb_dir: Optional[str] = typer.Option(None, "--wandb-dir"),
    per_step: int = typer.Option(20, "--per-step", help="Trajectories per step in the table."),
) -> None:
    """Log verl's validation dumps as W&B tables: prompt, searches, information, answer, reward components."""
    from masksearch_rl.eval.trajectories import log_generation_dumps
    from masksearch_rl.tracking import start_run

    config = _tracking(wandb_project, wandb_entity, wandb_name, wandb_group, wandb_mode, wandb_dir)
    with start_run(config, "rl-trajectories", {"dump_dir": str(dump_dir), "per_step": per_step}) as tracker:
        try:
            logged = log_generation_dumps(dump_dir, tracker, per_step=per_step)
        except FileNotFoundError as err:
            raise typer.BadParameter(str(err)) from err
    typer.echo(json.dumps({"logged_per_step": logged}))


def register(app: typer.Typer) -> None:
    """Add ``eval`` to the top-level app."""
    app.add_typer(eval_app, name="eval")


if __name__ == "__main__":
    eval_app()
