"""TFDS builder for the arithmetic task, written as array_record for random access (no TF), and
the build helpers every local builder shares (``build_once``, ``LocalBuilderMixin``).

The dataset is generated locally (no downloads) into ``DataConfig.data_dir``. Each setting of
``(seed, num_train, num_test, levels)`` is its own builder config with its own directory, so
different settings never share files. Bump ``ArithReasoning.VERSION`` whenever ``arith`` changes
what it generates, or stale files would be reused.

Crash and concurrency safety: TFDS writes into an ``incomplete.*`` temporary directory and renames
it to ``<data_dir>/pipo_arith/<config>/<version>`` only after every file and the metadata are
written, and a dataset counts as built only when that final directory holds its metadata. On top
of that, builds are serialised with an exclusive file lock, so a second process waits and then
reuses the first one's dataset instead of racing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from pipo_jax.config import DataConfig
from pipo_jax.data import arith

log = logging.getLogger(__name__)

NAME = "pipo_arith"


def config_name(seed: int, num_train: int, num_test: int, levels: tuple[int, ...]) -> str:
    """A directory-safe name that encodes every generation setting."""
    return f"s{seed}_tr{num_train}_te{num_test}_l{'-'.join(str(x) for x in levels)}"


class ArithConfig(tfds.core.BuilderConfig):
    """One generation setting of the arithmetic task."""

    def __init__(self, *, seed: int, num_train: int, num_test: int,
                 levels: tuple[int, ...], **kwargs: Any) -> None:
        levels = tuple(int(x) for x in levels)
        super().__init__(name=config_name(seed, num_train, num_test, levels),
                         description=f"seed={seed} train={num_train} test={num_test} "
                                     f"levels={levels}", **kwargs)
        self.seed = seed
        self.num_train = num_train
        self.num_test = num_test
        self.levels = levels

    @classmethod
    def from_data_config(cls, data_cfg: DataConfig) -> ArithConfig:
        return cls(seed=data_cfg.seed, num_train=data_cfg.num_train, num_test=data_cfg.num_test,
                   levels=data_cfg.levels)


class LocalBuilderMixin:
    """What every builder of locally generated data here shares (mix in before
    ``tfds.core.GeneratorBasedBuilder``): configs built at run time, and no download banners."""

    def _create_builder_config(self, builder_config: Any,
                               version: Any) -> tfds.core.BuilderConfig | None:
        # Every config is "custom" here; TFDS would warn about that on each construction
        # (including unpickling in grain workers).
        if isinstance(builder_config, tfds.core.BuilderConfig):
            return builder_config
        return super()._create_builder_config(builder_config, version)  # type: ignore[misc]

    # TFDS prints "Downloading and preparing…" banners to stdout; ``build_once`` logs one line
    # instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


class ArithReasoning(LocalBuilderMixin, tfds.core.GeneratorBasedBuilder):
    """Column-addition problems with worked solutions (``pipo_jax.data.arith``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Two-operand column addition with carries."}
    # No BUILDER_CONFIGS: every config is built from a ``DataConfig`` (see ``ArithConfig``), and
    # TFDS refuses a custom config that shares a name with a listed one.

    # TFDS derives the name from the class name; pin it so that renaming the class keeps data.
    name = NAME

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "question": tfds.features.Text(),
                "response": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "level": tfds.features.Scalar(dtype=np.int32),
            }),
            supervised_keys=None,
            # Keep generation order on disk (level-cycled), so that the first n test examples
            # cover all levels evenly and match ``arith.generate_split``; the loader shuffles.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # generated locally
        cfg = self.builder_config
        return {"train": self._generate_examples("train", cfg.num_train),
                "test": self._generate_examples("test", cfg.num_test)}

    def _generate_examples(self, split: str, n: int) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        yield from enumerate(arith.generate_split(split, cfg.seed, n, cfg.levels))


def _builder(data_cfg: DataConfig) -> ArithReasoning:
    return ArithReasoning(config=ArithConfig.from_data_config(data_cfg),
                          data_dir=os.fspath(Path(data_cfg.data_dir).absolute()))


def _is_built(builder: tfds.core.DatasetBuilder) -> bool:
    # The same files TFDS's ``is_prepared`` checks, without its warning when they are missing.
    path = Path(builder.data_dir)
    return (path / "dataset_info.json").is_file() and (path / "features.json").is_file()


@contextlib.contextmanager
def _build_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive inter-process lock; released by the OS if the holder dies."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Turns TFDS's tqdm bars off for a build that takes seconds, then restores the setting."""
    was_on = bool(getattr(tfds.core.utils.tqdm_utils, "_active", True))
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(was_on)


def build(data_cfg: DataConfig) -> Path:
    """Builds the dataset of ``data_cfg`` unless it is already built; returns its directory."""
    return build_once(lambda: _builder(data_cfg))


def build_once(make_builder: Callable[[], tfds.core.DatasetBuilder]) -> Path:
    """Builds ``make_builder()``'s dataset as array_record unless it is already built, at most
    one process at a time (see the module docstring); returns its directory."""
    builder = make_builder()
    if _is_built(builder):
        return Path(builder.data_dir)
    config_dir = Path(builder.data_dir).parent
    with _build_lock(config_dir.parent / f".{config_dir.name}.lock"):
        # Another process may have finished the build while this one waited for the lock.
        builder = make_builder()
        if _is_built(builder):
            return Path(builder.data_dir)
        # Holding the lock, no cooperating process is writing: leftovers are from crashed builds.
        for stale in config_dir.glob("incomplete.*"):
            shutil.rmtree(stale, ignore_errors=True)
        log.warning("Building dataset %s into %s (first use of these data settings)…",
                    builder.info.full_name, builder.data_dir_root)
        start = time.perf_counter()
        with _no_progress_bars():
            # array_record, not TFDS's default tfrecord: random access, and readable without TF.
            builder.download_and_prepare(file_format=tfds.core.FileFormat.ARRAY_RECORD)
        log.info("Built %s in %.1f s.", builder.info.full_name, time.perf_counter() - start)
    return Path(builder.data_dir)


class _TextSource:
    """Random-access view over a TFDS data source that turns bytes fields into ``str``."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return _to_python(self._source[index])

    def __repr__(self) -> str:
        return f"_TextSource({self._source!r})"


def _to_python(record: dict) -> dict:
    out: dict = {}
    for k, v in record.items():
        if isinstance(v, bytes):
            out[k] = v.decode("utf-8")
        elif hasattr(v, "item"):  # numpy scalar
            out[k] = v.item()
        else:
            out[k] = v
    return out


def load_source(data_cfg: DataConfig, split: str) -> _TextSource:
    """Random-access source of ``split`` (``len(src)``, ``src[i]`` → dict with str ``question``,
    ``response``, ``answer`` and int ``level``), building the dataset first if needed."""
    if split not in arith.SPLITS:
        raise ValueError(f"split must be one of {arith.SPLITS}, got {split!r}")
    build(data_cfg)
    builder = _builder(data_cfg)
    return _TextSource(builder.as_data_source(split=split))
