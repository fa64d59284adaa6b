"""The training loop every stage shares: steps, metrics, progress, NaN guard, checkpoints and
stop signals."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

from pipo_jax.config import Config, TrainConfig, save_config
from pipo_jax.errors import Preempted, TrainingError
from pipo_jax.io import checkpoint as ckpt
from pipo_jax.io import diskerrors
from pipo_jax.model import sharding
from pipo_jax.train.metrics import MetricWriter
from pipo_jax.train.state import TrainState


@dataclasses.dataclass
class StageResult:
    stage_dir: Path
    steps: int
    final_metrics: dict[str, float]
    seconds: float


def _fmt(x: float) -> str:
    return f"{x:.3f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"

# ``advance(state, step) → (state, device metrics, host info)``: one optimiser step.
Advance = Callable[[TrainState, int], tuple[TrainState, dict[str, jax.Array], Any]]
# ``summarise(step, host metrics, host info) → extra scalars``, run one step late on the host.
Summarise = Callable[[int, dict[str, Any], Any], dict[str, float]]


def run_steps(cfg: Config, stage: str, state: TrainState, start: int, advance: Advance,
              summarise: Summarise | None = None, progress: bool = True) -> StageResult:
    """The training loop shared by every stage: steps ``start … steps-1``, metrics (JSONL and
    TensorBoard), progress bar, NaN guard and checkpoints every ``ckpt_every`` steps.

    The host side of a step (reading its metrics) runs one step late, so that the device never
    waits on the host. Non-scalar metrics (e.g. OPD's rollout tokens) are for ``summarise`` only.
    Checkpoints are written asynchronously; the loop waits for a save only when it is stopped
    and at the end (closing the manager). A failed write raises at the next step boundary at the
    latest (``ckpt.Manager.raise_failed_save``), as ``StorageError`` when the disk refused it:
    the run stops instead of training on with nothing saved.

    SIGTERM or SIGINT (``ckpt.StopSignals``; in a multi-process job, JAX's preemption sync point)
    stops the loop after the current step: that step's metrics are checked (NaN guard) and
    logged, its state is saved and committed, the files are closed, the previous signal
    handlers restored, and ``Preempted`` is raised. Running the stage again resumes from
    that step and reproduces the uninterrupted run exactly: batches and dropout keys are
    functions of the step, and the saved state is the whole training state.

    In a multi-process job every process runs this loop (and every save; orbax coordinates
    them); only process 0 writes metrics and shows the progress bar.
    """
    tc: TrainConfig = getattr(cfg, stage)
    stage_dir = Path(cfg.run_dir) / stage
    lead = jax.process_index() == 0
    final: dict[str, float] = {}
    t0 = time.time()
    tokens_seen = 0
    pending: tuple[int, dict[str, jax.Array], Any] | None = None
    stopped: tuple[int, int] | None = None  # (signal, step saved)
    # Context managers close the metric files, the bar and the checkpoint manager (waiting for
    # an in-flight save) also when a step raises. StopSignals is outermost so that a signal
    # during the final save or close is still only recorded, not fatal.
    with ckpt.StopSignals() as signals, \
            MetricWriter(stage_dir, prefix=stage) as writer, \
            tqdm(total=tc.steps, initial=start, desc=stage, disable=not (progress and lead),
                 unit="step", dynamic_ncols=True) as bar, \
            ckpt.open_manager(stage_dir, tc.keep_checkpoints,
                              keep_every=tc.keep_every) as manager:
        if lead:
            run_config = Path(cfg.run_dir) / "config.json"
            with diskerrors.reporting(run_config, elsewhere="set run_dir elsewhere"):
                save_config(cfg, run_config)

        def finish(step: int, metrics: dict[str, jax.Array], info: Any) -> None:
            nonlocal final, tokens_seen
            # Not jax.device_get: in a multi-process job the replicated metrics span devices of
            # other processes; to_host reads a local replica (and gathers sharded values).
            got = sharding.to_host(metrics)
            host = {k: float(v) for k, v in got.items() if getattr(v, "ndim", 0) == 0}
            if not math.isfinite(host["loss"]):
                raise TrainingError(
                    f"{stage} loss is {host['loss']} at step {step + 1}; nothing was saved after "
                    f"the last good checkpoint. Lower {stage}.learning_rate or check the data.")
            if summarise is not None:
                host.update(summarise(step, got, info))
            tokens_seen += int(host["target_tokens"])
            host["tokens_per_second"] = tokens_seen / max(time.time() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=_fmt(host["loss"]), tok_s=f"{host['tokens_per_second']:.0f}")
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
                writer.write_scalars(step + 1, host)
            final = host

        for step in range(start, tc.steps):
            state, metrics, info = advance(state, step)
            manager.raise_failed_save()  # stop now, not at the next save, if the last one failed
            if pending is not None:
                finish(*pending)
            pending = (step, metrics, info)
            # Polled every step on every process: in a multi-process job it is a sync point.
            signum = signals.requested(manager, step + 1)
            if signum is not None or (step + 1) % tc.ckpt_every == 0 or step + 1 == tc.steps:
                finish(*pending)  # the loss must be known finite before its state is saved
                pending = None
                # A stopping process is about to exit: wait until the step is committed.
                ckpt.save(manager, step + 1, state, cfg, stage,
                          wait=signum is not None)
            if signum is not None:
                stopped = (signum, step + 1)
                break
        if pending is not None:
            finish(*pending)
    if stopped is None and signals.signum is not None:
        # The signal came after the last step's check: that step is saved (the final step
        # always is, and closing the manager committed it), so stop before any next stage.
        stopped = (signals.signum, tc.steps)
    if stopped is not None:
        signum, step = stopped
        raise Preempted(
            f"{stage} stopped by {ckpt.signal_name(signum)} after step {step} of {tc.steps}; "
            f"checkpoint {step} is saved in {ckpt.checkpoint_dir(stage_dir)}; run the same "
            f"command again to resume", signum, step)
    return StageResult(stage_dir, tc.steps, final, time.time() - t0)

