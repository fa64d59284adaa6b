"""``train.py`` with SIGTERM sent to itself at one phase (tests/test_faults.py).

    python tests/fault_child.py PHASE [train.py arguments]

PHASE: ``data`` (while the TFDS data set is being written, after its third example),
``restore`` (while a resumed stage reads its checkpoint), ``save`` (inside orbax's write of a
checkpoint, on its background thread) or ``none``. The signal comes from inside the process at
a known point, so that the test does not race the phase it means to hit.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train.py

import orbax.checkpoint as ocp  # noqa: E402

import train  # noqa: E402
from pipo_jax.cli import run_main  # noqa: E402
from pipo_jax.data import tfds_builder  # noqa: E402
from pipo_jax.io import checkpoint as ckpt  # noqa: E402


def _sigterm() -> None:
    print(f"FAULT: SIGTERM during {PHASE}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


PHASE = sys.argv[1]
if PHASE == "data":
    generate = tfds_builder.ArithReasoning._generate_examples

    def _generate_examples(self: Any, *args: Any, **kwargs: Any) -> Any:
        for i, example in enumerate(generate(self, *args, **kwargs)):
            if i == 3:
                _sigterm()
            yield example

    tfds_builder.ArithReasoning._generate_examples = _generate_examples
elif PHASE == "restore":
    restore = ckpt.restore

    def _restore(*args: Any, **kwargs: Any) -> Any:
        _sigterm()
        return restore(*args, **kwargs)

    ckpt.restore = _restore
elif PHASE == "save":
    async_save = ocp.StandardCheckpointHandler.async_save
    sent = False

    async def _async_save(self: Any, *args: Any, **kwargs: Any) -> Any:
        global sent
        if not sent:  # the first save only
            sent = True
            _sigterm()
        return await async_save(self, *args, **kwargs)

    ocp.StandardCheckpointHandler.async_save = _async_save
elif PHASE != "none":
    raise SystemExit(f"unknown phase {PHASE!r}")

sys.exit(run_main(train.main, sys.argv[2:]))
