"""What wandb sees, on rank 0 only: the step metrics and the run (the console and
training.log: ``trainer.run_log``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from partialfc import StepStats
from trainer.config import WandbConfig
from trainer.wandb_rows import ROWS_FILE, RowRecord, last_logged_step


def step_metrics(stats: StepStats | None) -> dict[str, float]:
    """A Partial FC step's report as wandb metrics: ``train/loss_<term>``, ``angles/<name>``,
    ``train/embedding_norm_mean`` and ``train/classes_sampled_rank0``."""
    if stats is None:
        return {}
    out = {f"train/loss_{k}": float(v) for k, v in stats.losses.items()}
    if stats.embedding_norm_mean is not None:
        out["train/embedding_norm_mean"] = float(stats.embedding_norm_mean)
    if stats.angles is not None:
        out.update({f"angles/{k}": float(v) for k, v in stats.angles.scalars().items()})
    out["train/classes_sampled_rank0"] = stats.num_sampled
    return out


def flatten_metrics(prefix: str, tree: dict[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"prefix/a/b": 1}`` (wandb's summary keys)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(flatten_metrics(name, value))
        else:
            out[name] = value
    return out


def angle_histogram(stats: StepStats | None) -> dict[str, Any]:
    """A wandb histogram of the step's sample of target angles (none without one)."""
    if stats is None or stats.angles is None:
        return {}
    import wandb

    sample = stats.angles.target_angles_deg.detach().float().cpu().numpy()
    return {"angles/target_angle_hist": wandb.Histogram(sample)}


class WandbRun:
    """A thin wrapper over a wandb run with an explicit step; a no-op when disabled.

    The API key, if any, comes from the environment (WANDB_API_KEY), never from the config.

    A resumed training job continues the wandb run (``run_id``) from its checkpoint at
    ``step``; every step of the run is logged exactly once (``trainer.wandb_rows``: the rows
    a killed job's log lost up to the checkpoint are logged again, the steps the run already
    has are not).
    """

    def __init__(
        self,
        cfg: WandbConfig,
        run_dir: Path,
        name: str,
        config: dict[str, Any],
        enabled: bool,
        run_id: str | None = None,
        step: int = 0,
    ) -> None:
        self.run = None
        self.path: str | None = None
        self.rows = RowRecord(run_dir / ROWS_FILE)
        self.logged_up_to = -1  # the last step the run has: not logged again
        if not enabled or cfg.mode == "disabled":
            return
        import wandb  # heavy import, only on the logging rank

        run_dir.mkdir(parents=True, exist_ok=True)
        if run_id:
            self.logged_up_to = last_logged_step(run_dir, run_id)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=name,
            tags=cfg.tags,
            mode=cfg.mode,
            dir=str(run_dir),
            config=config,
            # A resumed training job continues the same wandb run (id saved in checkpoints).
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True),
        )
        self.path = str(Path(self.run.dir).parent)
        self.logged_up_to = max(self.logged_up_to, self.run.starting_step - 1)
        for row_step, metrics in self.rows.start(step if run_id else None, self.logged_up_to):
            self._call(lambda run, m=metrics, s=row_step: run.log(m, step=s))
            self.logged_up_to = max(self.logged_up_to, row_step)

    @property
    def id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log ``metrics`` at ``step`` (and keep the row), unless the run has that step."""
        if self.run is not None and step > self.logged_up_to:
            self.rows.append(step, metrics)
            self._call(lambda run: run.log(metrics, step=step))

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self._call(lambda run: run.summary.update(values))

    def finish(self) -> None:
        self.rows.close()
        if self.run is not None:
            self._call(lambda run: run.finish())
            self.run = None

    def _call(self, action: Any) -> None:
        """``action(run)``; if the wandb service is gone, wandb logging ends with one line
        and training goes on. Slurm's ``scancel`` and time limit send SIGTERM to every
        process of a job, wandb's service too: the trainer must still reach its checkpoint."""
        try:
            action(self.run)
        except OSError as exc:  # ConnectionResetError, BrokenPipeError: the service died
            print(f"facetrain: wandb logging stops here (its service is gone: {exc})", flush=True)
            self.run = None
