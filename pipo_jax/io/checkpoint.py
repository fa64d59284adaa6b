"""Orbax checkpoints of one training stage (``runs/<name>/<stage>``).

Layout of a stage directory::

    <stage_dir>/config.json            resolved config of the latest save, for humans and loaders
    <stage_dir>/checkpoints/<step>/    one orbax checkpoint per kept step, with two items:
        state/                         the train-state pytree (params, opt_state, step, ...)
        config/                        the resolved config dict saved with that step

Checkpoints live in their own ``checkpoints/`` subdirectory so that orbax's step discovery and
tmp-directory cleanup never touch the metrics and TensorBoard files beside them.

Crash safety comes from orbax: each save is written into ``<step>.orbax-checkpoint-tmp*`` and
renamed to ``<step>`` only once every file is on disk, so a process killed mid-save leaves the
previous checkpoint untouched and the unfinished directory is invisible to ``latest_step``.
``open_manager`` deletes such leftovers (``cleanup_tmp_directories=True``) before the next save.

Which checkpoints are kept is orbax's preservation policy: the newest ``keep`` steps, plus every
step that is a multiple of ``keep_every`` (kept forever; ``0`` turns this off). A step is deleted
only after a newer save has been committed, so a failed save never costs an older checkpoint.

A save that the disk refuses (full, read-only, not permitted) raises ``StorageError``: one line
with the step, the directory, the free space and the last committed step (``Manager``). The
training loop asks after every step whether the asynchronous save in flight has failed
(``Manager.raise_failed_save``), so it stops at the next step boundary instead of training on.

Preemption (see ``StopSignals``): while the training loop runs, SIGTERM and SIGINT only set a
flag; the loop finishes the current step, saves it synchronously and raises ``Preempted``, which
``pipo_jax.cli.run_main`` turns into a one-line message and exit status ``128 + signal``.

Restoring needs an *abstract* target: a pytree of ``jax.ShapeDtypeStruct`` that carry the
target sharding, usually ``abstract_target(jax.eval_shape(init_fn), shardings)``. Every array
is then read straight into its final sharding, without first materialising it on one device.
``restore_config`` reads the config of a checkpoint first, so a caller can rebuild the model
that the abstract target is derived from.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from pipo_jax.config import (
    PIPO_STAGES,
    STAGES,
    Config,
    ConfigError,
    save_config,
    saved_from_dict,
    to_dict,
)
from pipo_jax.errors import CheckpointError, StorageError
from pipo_jax.io import diskerrors, orbax_quirks

orbax_quirks.install()  # one error line, not pages of tracebacks from orbax's event loops

CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.json"
_STATE = "state"
_CONFIG = "config"
_TRAIN_HINT = "train this stage first with `python train.py`"


# --------------------------------------------------------------------------- paths and helpers


def checkpoint_dir(stage_dir: str | Path) -> Path:
    """The directory holding the orbax step directories of ``stage_dir`` (absolute: orbax
    refuses relative paths, and run directories are usually given relative to the cwd)."""
    return Path(stage_dir).absolute() / CHECKPOINT_SUBDIR


def abstract_target(tree: Any, shardings: jax.sharding.Sharding | Any) -> Any:
    """Returns ``tree`` as ``jax.ShapeDtypeStruct`` leaves that carry ``shardings``.

    ``tree`` may hold arrays or ``ShapeDtypeStruct`` (the output of ``jax.eval_shape``);
    ``shardings`` is one sharding for every leaf or a pytree of shardings matching ``tree``.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _check_abstract(tree: Any, what: str) -> None:
    """Rejects targets orbax would restore onto guessed devices instead of the caller's."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not isinstance(leaf, jax.ShapeDtypeStruct) or leaf.sharding is None:
            raise TypeError(
                f"{what} leaf {jax.tree_util.keystr(path)} must be a jax.ShapeDtypeStruct with a "
                f"sharding, got {leaf!r}; build the target with "
                "checkpoint.abstract_target(jax.eval_shape(...), shardings)")


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(err).__name__}: {line[:limit]}{'...' if len(line) > limit else ''}"


def _key_name(key: Any) -> str:
    # Orbax stores namedtuples and dataclasses as dicts and tuples as lists, so only the key
    # name/index is comparable between a saved metadata tree and a live abstract tree.
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = getattr(leaf, "shape", None)
        if shape is not None:
            out[".".join(_key_name(k) for k in path)] = tuple(shape)
    return out


def _structure_diff(saved_tree: Any, target: Any, limit: int = 4) -> str:
    """A one-line summary of how ``target`` differs from the saved tree, or '' if it fits.

    Dtypes are deliberately not compared: orbax casts on restore, and restoring float32
    weights into a bfloat16 target is a legitimate request.
    """
    saved, wanted = _shapes_by_path(saved_tree), _shapes_by_path(target)

    def order(names: set[str]) -> list[str]:
        # Parameter paths first: they name the model change, optimizer moments only echo it.
        return sorted(names, key=lambda n: (not n.startswith("params"), n))

    problems: list[str] = []
    missing = order(set(wanted) - set(saved))
    unexpected = order(set(saved) - set(wanted))
    if missing:
        problems.append(f"not in checkpoint: {', '.join(missing[:limit])}"
                        + (f" (+{len(missing) - limit} more)" if len(missing) > limit else ""))
    if unexpected:
        problems.append(f"only in checkpoint: {', '.join(unexpected[:limit])}"
                        + (f" (+{len(unexpected) - limit} more)" if len(unexpected) > limit
                           else ""))
    shape_diff = [f"{k} saved {saved[k]} vs wanted {wanted[k]}"
                  for k in order(set(saved) & set(wanted)) if saved[k] != wanted[k]]
    if shape_diff:
        problems.append("shape mismatch: " + "; ".join(shape_diff[:limit])
                        + (f" (+{len(shape_diff) - limit} more)" if len(shape_diff) > limit
                           else ""))
    return "; ".join(problems)


def _write_config_json(stage_dir: Path, cfg: Config) -> None:
    # Write-then-rename so a reader never sees a half-written config.json.
    final = stage_dir / CONFIG_FILE
    tmp = stage_dir / f".{CONFIG_FILE}.tmp"
    with diskerrors.reporting(final, elsewhere="set run_dir elsewhere"):
        save_config(cfg, tmp)
        os.replace(tmp, final)


# --------------------------------------------------------------------------- saving


def preservation_policy(keep: int,
                        keep_every: int = 0) -> ocp.checkpoint_managers.PreservationPolicy:
    """Orbax's policy for which committed steps survive a save: the newest ``keep``, plus every
    multiple of ``keep_every`` (forever; ``0``: none).

    Raises ValueError for ``keep < 1`` or ``keep_every < 0``.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    if keep_every < 0:
        raise ValueError(f"keep_every must be >= 0 (0: off), got {keep_every}")
    policies = ocp.checkpoint_managers
    keep_newest = policies.LatestN(n=keep)
    if not keep_every:
        return keep_newest
    # exact_interval: keep steps divisible by keep_every, not "at least keep_every apart", so
    # the kept set does not depend on where preemption saves happened to fall.
    return policies.AnyPreservationPolicy([
        keep_newest, policies.EveryNSteps(interval_steps=keep_every, exact_interval=True)])


class Manager(ocp.CheckpointManager):
    """Orbax's checkpoint manager, whose saves refused by the disk (full, read-only, not
    permitted: ``diskerrors.storage_errno``) raise ``StorageError`` naming the step, the
    directory, the free space and the last committed step.

    A failed asynchronous save is reported as its own step, from whichever call finds it:
    ``raise_failed_save`` (polled by the training loop), the next ``save``,
    ``wait_until_finished`` or ``close``.
    """

    def __init__(self, *args: Any, elsewhere: str = "set run_dir elsewhere",
                 **kwargs: Any) -> None:
        self._pending: int | None = None  # the step whose asynchronous write may still fail
        self._elsewhere = elsewhere  # the way out named in the error, after "free space or"
        super().__init__(*args, **kwargs)

    def save(self, step: int, *args: Any, **kwargs: Any) -> bool:
        self.wait_until_finished()  # orbax's save waits too, but would not say which step failed
        with self._reporting(step):
            started = super().save(step, *args, **kwargs)
        if started:
            self._pending = step
        return started

    def wait_until_finished(self) -> None:
        step, self._pending = self._pending, None
        with self._reporting(step):
            super().wait_until_finished()

    def raise_failed_save(self) -> None:
        """Raises the error of the last save if it has failed; returns at once while it is
        still being written, and when it was committed."""
        if self._pending is not None and not self.is_saving_in_progress():
            self.wait_until_finished()  # finished: no wait, only its error if any

    @contextlib.contextmanager
    def _reporting(self, step: int | None) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except Exception as e:
            if step is None or (not isinstance(e, OSError)
                                and diskerrors.storage_errno(e) is None):
                raise
            raise StorageError(diskerrors.write_error(
                self.directory, e, f"save checkpoint step {step} to", self._elsewhere,
                self._committed(step))) from e

    def _committed(self, failed: int) -> str:
        try:
            self.reload()  # what is on disk now, not what this manager last knew
            steps = [s for s in self.all_steps() if s != failed]
        except Exception:  # noqa: BLE001 (the save's error is the one to report)
            return ""
        if not steps:
            return "no checkpoint of this stage was committed before"
        return f"the last committed checkpoint (step {max(steps)}) is intact"


def open_manager(stage_dir: str | Path, keep: int, keep_every: int = 0) -> Manager:
    """Opens (creating if needed) the checkpoint manager of ``stage_dir`` for saving.

    Args:
      stage_dir: the stage's run directory, e.g. ``runs/default/sft``.
      keep: how many of the newest checkpoints to keep; older ones are deleted after a save
        commits (unless ``keep_every`` keeps them).
      keep_every: also keep every checkpoint whose step is a multiple of this, forever; 0: off.

    Every ``save`` writes (the training loop decides which steps to save). Use it as a context
    manager (or call ``.close()``): closing waits for the last asynchronous save to be
    committed and raises its error if it failed (``StorageError`` when the disk refused it).
    """
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation_policy(keep, keep_every),
        create=True,
        # A crash mid-save leaves a `<step>.orbax-checkpoint-tmp*` directory. Step discovery
        # ignores it, but each one can hold a full copy of the state, so delete them on open.
        cleanup_tmp_directories=True,
        # Writes happen in a background thread after the arrays are copied to host memory, so
        # training continues during the disk write; an error surfaces from the next save, from
        # ``wait_until_finished`` or from ``close``, and the step is then not committed.
        enable_async_checkpointing=True,
        # The step's directories are made before save returns (a few mkdirs), so that a read-only
        # or full disk fails that save at once. Made in the background instead, a failed mkdir
        # leaves orbax's item writers waiting for its completion signal until their timeout:
        # the process hangs for minutes after the error, then logs a traceback per writer.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
    )
    root = checkpoint_dir(stage_dir)
    with diskerrors.reporting(root, "create", "set run_dir elsewhere"):
        return Manager(root, options=options,
                       item_handlers=_item_handlers(ocp.StandardCheckpointHandler()))


def _item_handlers(state_handler: ocp.CheckpointHandler) -> dict[str, ocp.CheckpointHandler]:
    return {_STATE: state_handler, _CONFIG: ocp.JsonCheckpointHandler()}


def save(manager: ocp.CheckpointManager, step: int, state: Any, cfg: Config, stage: str,
         wait: bool = False) -> bool:
    """Saves ``state`` and ``cfg`` as checkpoint ``step`` of ``stage`` (one of ``STAGES``,
    recorded in the step's metadata with whether the model is PIPO; ``saved_stage`` reads it);
    returns whether a save was started: False when a checkpoint of ``step`` already exists (a
    run resumed from ``step`` has exactly that state, and orbax refuses to overwrite a committed
    step).

    The save is asynchronous; pass ``wait=True`` (or close the manager) to block until it is
    committed, which also raises the error of a failed write. ``config.json`` in the stage
    directory is rewritten (by process 0) for every save that starts.
    """
    if step in manager.all_steps():
        return False
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                 _CONFIG: ocp.args.JsonSave(to_dict(cfg))})
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    started = manager.save(step, args=args, force=True,
                           custom_metadata={"stage": stage, "pipo": stage in PIPO_STAGES})
    # Every process calls save (orbax coordinates the array writes); one writes the JSON copy,
    # so that processes sharing a file system do not race on it.
    if started and jax.process_index() == 0:
        _write_config_json(Path(manager.directory).parent, cfg)
    if wait:
        manager.wait_until_finished()
    return started


# Orbax deep-copies numpy leaves before an asynchronous save (in case the caller mutates them
# meanwhile): a second full copy of a converted model. ``save_params`` waits for the commit and
# never mutates its tree, so its numpy leaves are written in place, through a registry of its
# own (orbax's global one is left alone).
_IN_PLACE_HANDLERS = ocp.type_handlers.create_type_handler_registry(
    (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
    (jax.Array, ocp.type_handlers.ArrayHandler()),
    *((t, ocp.type_handlers.ScalarHandler()) for t in (int, float, np.number)))


def save_params(stage_dir: str | Path, step: int, params: Any, cfg: Config, stage: str,
                keep: int = 1) -> None:
    """Writes a params-only checkpoint (``{"step", "params"}``, no optimizer state) of
    ``stage`` at ``step`` and waits for its commit: an imported or merged model, which a stage
    resumes from with fresh adapters and optimizer. Numpy leaves are written without a copy."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation_policy(keep), create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=False)
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_IN_PLACE_HANDLERS)
    state = {"step": np.int32(step), "params": params}
    root = checkpoint_dir(stage_dir)
    with diskerrors.reporting(root, "create", "write elsewhere"):
        manager = Manager(root, options=options, item_handlers=_item_handlers(handler),
                          elsewhere="write elsewhere")
    with manager:
        args = ocp.args.Composite(**{_STATE: ocp.args.PyTreeSave(state),
                                     _CONFIG: ocp.args.JsonSave(to_dict(cfg))})
        manager.save(step, args=args, force=True,
                     custom_metadata={"stage": stage, "pipo": stage in PIPO_STAGES})
        manager.wait_until_finished()
    if jax.process_index() == 0:
        _write_config_json(Path(stage_dir), cfg)


# --------------------------------------------------------------------------- preemption


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """While active, SIGTERM (preemption) and SIGINT (Ctrl-C) ask the training loop to stop.

    The handler only records the signal; the loop polls ``requested(manager, step)`` after each
    step, then saves and raises ``Preempted``. Doing the save in the handler instead would run
    orbax (threads, locks, device transfers) re-entrantly in the middle of arbitrary code.

    * A second SIGINT raises ``KeyboardInterrupt`` at once: the way out of a step or a save that
      hangs. The committed checkpoints stay intact (orbax commits by renaming).
    * Signals set to be ignored (``SIG_IGN``: a ``nohup`` job, a background job's SIGINT) stay
      ignored, and handlers installed outside Python (``getsignal`` gives None) are left alone,
      as they could not be put back afterwards.
    * Handlers can only be installed from the main thread; elsewhere (a loop run in a worker
      thread) nothing is installed, with a warning, and signals act as they did before.
    * Multi-process jobs (``jax.process_count() > 1``) install nothing: every process must stop
      at the same step, which a signal delivered to one host cannot arrange. JAX's preemption
      service (started by ``jax.distributed.initialize``) owns SIGTERM there; ``requested``
      asks it whether all processes reached the agreed sync step
      (``CheckpointManager.reached_preemption``), and every process then saves that step.

    The previous handlers are restored on exit, so nothing is left behind.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._multiprocess = False

    def __enter__(self) -> StopSignals:
        self.signum = None
        self._multiprocess = jax.process_count() > 1
        if self._multiprocess:
            return self
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("training runs outside the main thread, so it cannot catch SIGTERM or "
                          "SIGINT: a signal stops it without saving the current step",
                          RuntimeWarning, stacklevel=2)
            return self
        for sig in self.SIGNALS:
            previous = signal.getsignal(sig)
            if previous is None or previous == signal.SIG_IGN:
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, manager: ocp.CheckpointManager, step: int) -> int | None:
        """The signal that asks to stop after ``step`` (steps completed), or None.

        In a multi-process job this is a preemption sync point: every process must call it
        after every step, with the same ``step``.
        """
        if self.signum is None and self._multiprocess and manager.reached_preemption(step):
            self.signum = signal.SIGTERM  # JAX's preemption notice is SIGTERM by default
        return self.signum

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


# --------------------------------------------------------------------------- restoring


def latest_step(stage_dir: str | Path) -> int | None:
    """The newest committed checkpoint step of ``stage_dir``, or None if there is none.

    Unfinished saves (orbax tmp directories) are ignored.
    """
    root = checkpoint_dir(stage_dir)
    if not root.is_dir():
        return None
    with _open_reader(root, ocp.StandardCheckpointHandler()) as manager:
        return manager.latest_step()


def all_steps(stage_dir: str | Path) -> list[int]:
    """All committed checkpoint steps of ``stage_dir``, oldest first."""
    root = checkpoint_dir(stage_dir)
    if not root.is_dir():
        return []
    with _open_reader(root, ocp.StandardCheckpointHandler()) as manager:
        return sorted(manager.all_steps())


def _open_reader(root: Path, state_handler: ocp.CheckpointHandler) -> ocp.CheckpointManager:
    # create=False without read_only: a reader never saves, and read_only only adds two warning
    # lines per open (every `pipo_jax.load` opens several readers).
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    return ocp.CheckpointManager(root, options=options,
                                 item_handlers=_item_handlers(state_handler))


def _open_for_restore(stage_dir: Path,
                      state_handler: ocp.CheckpointHandler) -> ocp.CheckpointManager:
    if not stage_dir.is_dir():
        raise CheckpointError(f"{stage_dir}: no such run directory; {_TRAIN_HINT}")
    root = checkpoint_dir(stage_dir)
    if not root.is_dir():
        raise CheckpointError(f"{stage_dir} has no {CHECKPOINT_SUBDIR}/ directory; {_TRAIN_HINT}")
    return _open_reader(root, state_handler)


def _resolve_step(manager: ocp.CheckpointManager, stage_dir: Path, step: int | None) -> int:
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointError(
            f"{stage_dir} has no finished checkpoint (a run stopped before its first save "
            f"leaves none); {_TRAIN_HINT}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointError(
            f"{stage_dir} has no checkpoint for step={step}; available steps: {steps}")
    return step


def _corrupt(manager: ocp.CheckpointManager, step: int, err: BaseException) -> CheckpointError:
    steps = sorted(manager.all_steps())
    earlier = [s for s in steps if s < step]
    fallback = (f"delete {Path(manager.directory) / str(step)} to fall back to step "
                f"{earlier[-1]}, or restore an earlier one with step= (available: {earlier})"
                if earlier else
                f"delete {Path(manager.directory) / str(step)} and retrain; no earlier "
                "checkpoint exists")
    return CheckpointError(
        f"checkpoint step {step} in {manager.directory} is corrupt or incomplete "
        f"({_first_line(err)}); {fallback}")


def _config_of(manager: ocp.CheckpointManager, step: int, raw: Any) -> Config:
    try:
        return saved_from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(
            f"the config saved with checkpoint step {step} in {manager.directory} does not fit "
            f"this version of pipo_jax ({e})") from e


def _check_structure(manager: ocp.CheckpointManager, step: int, target: Any,
                     subtree: Sequence[str] = ()) -> None:
    """Compares ``target`` with the saved tree (or its ``subtree``) before reading any array.

    Orbax would also fail on a mismatch, but with a multi-line message that does not say the
    likely cause (a different model config), and only after starting to read arrays.
    """
    try:
        metadata = manager.item_metadata(step)[_STATE]
        saved = getattr(metadata, "tree", metadata)
        if saved is None:
            raise ValueError("no tree metadata for the 'state' item")
        for key in subtree:
            saved = saved[key]
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(
            f"checkpoint step {step} in {manager.directory} has no {'/'.join(subtree)} subtree "
            f"({_first_line(e)}); it was not saved by pipo_jax.io.checkpoint.save") from e
    except Exception as e:
        raise _corrupt(manager, step, e) from e
    diff = _structure_diff(saved, target)
    if diff:
        raise CheckpointError(
            f"checkpoint step {step} in {manager.directory} does not match the requested "
            f"structure, so it was probably saved with a different model or optimizer config "
            f"(compare {Path(manager.directory).parent / CONFIG_FILE}): {diff}")


def restore(stage_dir: str | Path, abstract_state: Any,
            step: int | None = None) -> tuple[Any, Config]:
    """Restores the train state and its config from checkpoint ``step`` (default: the latest).

    Args:
      stage_dir: the stage's run directory.
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` with shardings, with the structure
        and shapes of the saved state (see ``abstract_target``). Leaves are cast to its dtypes.
      step: the step to restore; None means the newest committed checkpoint.

    Returns:
      ``(state, config)``: the restored pytree and the config saved with that step.

    Raises:
      CheckpointError: missing directory, no checkpoints, unknown step, structure mismatch or
        a corrupt checkpoint; the message says what to do.
    """
    stage_dir = Path(stage_dir)
    _check_abstract(abstract_state, "abstract_state")
    with _open_for_restore(stage_dir, ocp.StandardCheckpointHandler()) as manager:
        step = _resolve_step(manager, stage_dir, step)
        _check_structure(manager, step, abstract_state)
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state),
                                     _CONFIG: ocp.args.JsonRestore()})
        try:
            restored = manager.restore(step, args=args)
        except Exception as e:
            raise _corrupt(manager, step, e) from e
        return restored[_STATE], _config_of(manager, step, restored[_CONFIG])


def restore_params(stage_dir: str | Path, abstract_params: Any,
                   step: int | None = None) -> tuple[Any, Config]:
    """Restores only ``state["params"]`` (and the config), leaving the optimizer state on disk.

    Orbax's ``PyTreeRestore(partial_restore=True)`` reads just the requested subtree, so loading
    weights for inference costs no memory or I/O for the (2x larger) Adam moments. The saved
    state must be a mapping with a ``"params"`` entry.
    """
    stage_dir = Path(stage_dir)
    _check_abstract(abstract_params, "abstract_params")
    target = {"params": abstract_params}
    # StandardCheckpointHandler cannot restore part of a tree; PyTreeCheckpointHandler reads the
    # same on-disk format and can.
    with _open_for_restore(stage_dir, ocp.PyTreeCheckpointHandler()) as manager:
        step = _resolve_step(manager, stage_dir, step)
        _check_structure(manager, step, abstract_params, subtree=("params",))
        args = ocp.args.Composite(**{
            _STATE: ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True),
            _CONFIG: ocp.args.JsonRestore()})
        try:
            restored = manager.restore(step, args=args)
        except Exception as e:
            raise _corrupt(manager, step, e) from e
        return restored[_STATE]["params"], _config_of(manager, step, restored[_CONFIG])


def saved_keys(stage_dir: str | Path, step: int | None = None) -> set[str]:
    """Top-level keys of the saved state of checkpoint ``step`` (default: the latest).

    A full train state has ``params``, ``opt_state`` and ``step``; a params-only checkpoint
    (an imported model, ``python -m pipo_jax.io.hf.convert hf-to-pipo``) has no ``opt_state``.
    """
    stage_dir = Path(stage_dir)
    with _open_for_restore(stage_dir, ocp.PyTreeCheckpointHandler()) as manager:
        step = _resolve_step(manager, stage_dir, step)
        try:
            metadata = manager.item_metadata(step)[_STATE]
            tree = getattr(metadata, "tree", metadata)
            return {str(k) for k in tree}
        except Exception as e:
            raise _corrupt(manager, step, e) from e


def restore_config(stage_dir: str | Path, step: int | None = None) -> Config:
    """The config saved with checkpoint ``step`` (default: the latest), without any arrays.

    Use it to rebuild the model whose shapes ``restore`` needs as its abstract target.
    """
    stage_dir = Path(stage_dir)
    with _open_for_restore(stage_dir, ocp.StandardCheckpointHandler()) as manager:
        step = _resolve_step(manager, stage_dir, step)
        try:
            restored = manager.restore(
                step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))
        except Exception as e:
            raise _corrupt(manager, step, e) from e
        return _config_of(manager, step, restored[_CONFIG])


def saved_stage(stage_dir: str | Path, step: int | None = None) -> str | None:
    """The stage recorded with checkpoint ``step`` (default: the latest), or None for a
    checkpoint saved before stages were recorded (``pipo_jax.io.run_dir.stage_of`` handles
    those)."""
    stage_dir = Path(stage_dir)
    with _open_for_restore(stage_dir, ocp.StandardCheckpointHandler()) as manager:
        step = _resolve_step(manager, stage_dir, step)
        try:
            custom = manager.metadata(step).custom_metadata or {}
        except Exception as e:
            raise _corrupt(manager, step, e) from e
    stage = custom.get("stage")
    if stage is not None and stage not in STAGES:
        raise CheckpointError(f"checkpoint step {step} in {checkpoint_dir(stage_dir)} records an "
                              f"unknown stage {stage!r}; it was not saved by this pipo_jax")
    return stage
