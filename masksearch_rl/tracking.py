"""Experiment tracking for our own commands (data generation, eval): a small wrapper around W&B.

Why a wrapper: every command logs the same way (project and run name from its options, ``job_type`` saying what
the run is, the config, summary metrics, a few tables), and must work with W&B switched off, offline
(``WANDB_MODE=offline``, e.g. on clusters without network) or online. Switched off, :func:`start_run` returns a
tracker whose methods do nothing, so callers never branch. ``wandb`` is imported only when a run starts.

The API key is never passed on the command line or stored in a config: W&B reads ``WANDB_API_KEY`` (or the
variable named by ``api_key_env``) from the environment, or the credentials of ``wandb login``. Online mode
without either fails at start with a message saying what to set.

RL and SFT runs log through verl's own logger (``trainer.logger=[console,wandb]``); see docs/eval.md for what
verl logs and :mod:`masksearch_rl.eval.trajectories` for the sample-trajectory table built from its dumps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")


@dataclass
class TrackingConfig:
    """Where to log. Tracking is on when ``project`` is set (or ``enabled`` is true) and mode is not disabled.

    ``mode`` None means ``$WANDB_MODE`` or, unset, online. ``api_key_env`` is the *name* of the variable holding
    the key (only read in online mode).
    """

    project: str | None = None
    enabled: bool | None = None
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    mode: str | None = None
    dir: str | None = None
    api_key_env: str = "WANDB_API_KEY"

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"W&B mode must be one of {MODES}, got {self.mode!r}")
        self.tags = tuple(self.tags or ())

    @property
    def resolved_mode(self) -> str:
        mode = self.mode or os.environ.get("WANDB_MODE") or "online"
        return "offline" if mode == "dryrun" else mode

    @property
    def active(self) -> bool:
        wanted = self.enabled if self.enabled is not None else bool(self.project)
        return bool(wanted) and self.resolved_mode != "disabled"


class Tracker(Protocol):
    """What commands log through. All methods are safe to call when tracking is off."""

    enabled: bool

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None: ...

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None,
                  metrics: Mapping[str, Any] | None = None) -> None: ...

    def log_images(self, images: Mapping[str, str | os.PathLike], step: int | None = None) -> None: ...

    def summary(self, values: Mapping[str, Any]) -> None: ...

    def finish(self) -> None: ...


class NullTracker:
    """Tracking off: every call is a no-op."""

    enabled = False
    run_dir: Path | None = None

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        return None

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None,
                  metrics: Mapping[str, Any] | None = None) -> None:
        return None

    def log_images(self, images: Mapping[str, str | os.PathLike], step: int | None = None) -> None:
        return None

    def summary(self, values: Mapping[str, Any]) -> None:
        return None

    def finish(self) -> None:
        return None

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()


@dataclass
class WandbTracker:
    """A live W&B run (online or offline)."""

    run: Any
    enabled: bool = True
    _finished: bool = field(default=False, repr=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir).parent  # run.dir is <run>/files

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.run.log(dict(flatten(metrics)), step=step)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None,
                  metrics: Mapping[str, Any] | None = None) -> None:
        """Log a table, and ``metrics`` in the same history row. One call, because W&B's step only moves forward:
        a table logged without a step advances it, and numbers logged after it at that ``step`` are dropped."""
        import wandb

        table = wandb.Table(columns=list(columns), data=[[_cell(v) for v in row] for row in rows], allow_mixed_types=True)
        self.run.log({**dict(flatten(metrics or {})), name: table}, step=step)

    def log_images(self, images: Mapping[str, str | os.PathLike], step: int | None = None) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path)) for name, path in images.items()}, step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        for key, value in flatten(values):
            self.run.summary[key] = value

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish()

    def __enter__(self) -> WandbTracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()


def start_run(cfg: TrackingConfig | None, job_type: str, config: Mapping[str, Any] | None = None) -> Tracker:
    """Start a run for a command (``job_type``: "synth", "ramp-generate", "eval", ...); a :class:`NullTracker`
    when tracking is off. ``config`` (the command's options) is logged as the run config."""
    if cfg is None or not cfg.active:
        return NullTracker()
    mode = cfg.resolved_mode
    import wandb

    if mode == "online":
        key = os.environ.get(cfg.api_key_env)
        if key:
            os.environ.setdefault("WANDB_API_KEY", key)  # only the environment carries the key
        elif not _logged_in():
            raise RuntimeError(
                f"W&B online logging needs a key: export {cfg.api_key_env}=... (or run `wandb login`), "
                "or log without network with WANDB_MODE=offline (upload later with `wandb sync`)"
            )
    if cfg.dir:
        Path(cfg.dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.project or "masksearch-rl",
        entity=cfg.entity,
        name=cfg.name,
        group=cfg.group,
        tags=list(cfg.tags) or None,
        job_type=job_type,
        mode=mode,
        dir=cfg.dir,
        config=_plain(dict(config or {})),
        reinit="finish_previous",
    )
    logger.info("W&B run %s (%s, %s) in %s", run.name, job_type, mode, run.dir)
    return WandbTracker(run)


def _logged_in() -> bool:
    """Whether `wandb login` left credentials (netrc) for the default host."""
    import netrc

    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return base in hosts


def flatten(values: Mapping[str, Any], prefix: str = "", sep: str = "/") -> list[tuple[str, Any]]:
    """Nested dicts to ``a/b`` keys (W&B charts want flat keys; ``sep`` joins them); None values dropped."""
    flat: list[tuple[str, Any]] = []
    for key, value in values.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat += flatten(value, name, sep)
        elif value is not None:
            flat.append((name, value))
    return flat


def _cell(value: Any) -> Any:
    """Table cells: numbers and strings as they are, anything else as compact text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    import json

    return json.dumps(value, ensure_ascii=False, default=str)


def _plain(value: Any) -> Any:
    """Config values W&B can store (paths and tuples as strings / lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)

