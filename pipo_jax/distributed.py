"""Multi-process start-up (one process per host, or per GPU): ``jax.distributed.initialize``
driven by command-line flags.

Every process runs the same command; after ``initialize`` the program sees one global device
mesh, and ``pipo_jax.model.sharding`` splits the global batch over it. Launch recipes (TPU pod
slice, multi-GPU hosts, localhost) are in docs/scaling.md, "Multi-host launch".

These are launch settings, not model settings: they are flags, never saved with a checkpoint,
and a run may resume on another number of processes or devices.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax

from pipo_jax.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the multi-process flags to ``parser``."""
    group = parser.add_argument_group(
        "multi-process", "one process per host (TPU) or per GPU; every process runs the same "
        "command with its own --process-id")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0's coordination service; with "
                            "--num-processes and --process-id")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0 … N-1")
    group.add_argument("--local-device-ids", metavar="IDS",
                       help="comma-separated local devices this process drives (e.g. one GPU "
                            "per process: 0, 1, …); default: all")
    group.add_argument("--distributed-auto", action="store_true",
                       help="detect the coordinator, process count and id from the cluster "
                            "(Cloud TPU pod slices, SLURM, Open MPI)")
    group.add_argument("--cpu-devices", type=int, metavar="N",
                       help="simulate N CPU devices in this process (testing sharded runs "
                            "without accelerators)")


def _device_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise ConfigError(f"--local-device-ids must be comma-separated integers, got {text!r}"
                          ) from e


def simulate_cpu_devices(n: int | None) -> None:
    """``--cpu-devices N``: the CPU backend shows N devices (None: as JAX decides). Must run
    before anything touches a JAX device."""
    if n is None:
        return
    if n < 1:
        raise ConfigError(f"--cpu-devices must be positive, got {n}")
    jax.config.update("jax_num_cpu_devices", n)


def initialize(args: argparse.Namespace) -> None:
    """Starts JAX's multi-process runtime as the flags say (nothing when none is given).

    Must run before anything touches a JAX device: the device count is fixed at start-up.
    """
    simulate_cpu_devices(args.cpu_devices)
    manual = [args.coordinator, args.num_processes, args.process_id]
    if args.distributed_auto:
        if any(v is not None for v in manual):
            raise ConfigError("--distributed-auto detects --coordinator, --num-processes and "
                              "--process-id; give either it or them")
        jax.distributed.initialize(local_device_ids=_device_ids(args.local_device_ids))
        return
    if all(v is None for v in manual):
        if args.local_device_ids is not None:
            raise ConfigError("--local-device-ids needs --coordinator (or --distributed-auto)")
        return
    if any(v is None for v in manual):
        raise ConfigError("a multi-process run needs all of --coordinator, --num-processes "
                          "and --process-id")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise ConfigError(f"--process-id must be in 0 … {args.num_processes - 1} for "
                          f"--num-processes {args.num_processes}, got {args.process_id}")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               local_device_ids=_device_ids(args.local_device_ids))


def describe(devices: Sequence[jax.Device] | None = None) -> str:
    """One line about the runtime, e.g. ``process 0 of 2, 4 of 8 devices (cpu)``."""
    devices = list(devices) if devices is not None else jax.devices()
    return (f"process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.local_device_count()} of {len(devices)} devices ({devices[0].platform})")
