"""Continuous batching: a fixed number of decode slots, refilled as rows finish.

The device holds one ``DecodeState`` of ``slots`` rows. A request is prefilled alone
(``engine.fill`` at batch 1, chunked), its first output sampled (``engine.first_emit``) and the
row written into a free slot (``insert_row``); the decode loop (``run_steps``) then runs every
occupied slot, each at its own cache length, position and step, for at most ``sync_steps``
steps or until a row finishes, and returns to the host, which takes the finished rows out and
admits the next requests. Nothing is recompiled when a request joins: every program has the
same shapes whatever the queue holds.

The ``k`` samples of one prompt share a single prefill: the cache is filled once and copied
into ``k`` slots, each sampling its first output with its own key (``docs/decode_engine.md``).

Every request gets exactly what it would get decoded alone in the same slots: its rows of
each step depend only on its own cache, key and step (the blocked attention's extra blocks,
filled only by other rows, add exact zeros).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pipo_jax.decode import engine
from pipo_jax.decode.sampling import request_keys
from pipo_jax.errors import PromptError

Array = jax.Array
Params = dict[str, Any]
STAT_FIELDS = ("n_tokens", "n_passes", "n_drafts", "n_commits")


@dataclasses.dataclass
class RowResult:
    """One request's outcome: its output slots (``out``: pairs for PIPO, PAD where nothing was
    emitted), counts, and seconds to its first output (``ttft``) and from there to its last
    (``decode``); or ``error``, the one-line reason it was refused."""

    out: np.ndarray | None = None
    n_tokens: int = 0
    n_passes: int = 0
    n_drafts: int = 0
    n_commits: int = 0
    ttft: float = 0.0
    decode: float = 0.0
    error: str | None = None


def insert_row(state: engine.DecodeState, row: engine.DecodeState,
               slot: Array) -> engine.DecodeState:
    """``row`` (a one-row ``DecodeState``) written into slot ``slot`` of ``state``."""

    def put(path: tuple[Any, ...], big: Array, small: Array) -> Array:
        if engine.is_stacked(path):
            return big.at[:, slot].set(small[:, 0])
        return big.at[slot].set(small[0])

    return jax.tree_util.tree_map_with_path(put, state, row)


def take_row(state: engine.DecodeState, slot: Array) -> dict[str, Array]:
    """What the host needs of a finished slot: its output and counts."""
    return {"out": state.out[slot], **{f: getattr(state, f)[slot] for f in STAT_FIELDS}}


def release_row(state: engine.DecodeState, slot: Array) -> engine.DecodeState:
    """Marks ``slot`` free: done, and its cache empty (so the blocked attention of the other
    rows stops at their own lengths)."""
    cache = state.cache.replace(start=state.cache.start.at[slot].set(0),
                                length=state.cache.length.at[slot].set(0))
    return state.replace(cache=cache, done=state.done.at[slot].set(True))


def run_steps(params: Params, state: engine.DecodeState, threshold: Array, max_steps: Array,
              stop_on_finish: Array, *, spec: engine.DecodeSpec) -> engine.DecodeState:
    """Decode steps of every running slot: at most ``max_steps``, and (``stop_on_finish``) only
    until some row finishes, so its slot can take the next request."""
    done0 = state.done

    def cond(carry: tuple[engine.DecodeState, Array]) -> Array:
        st, i = carry
        finished = jnp.any(st.done & ~done0)
        return (i < max_steps) & ~jnp.all(st.done) & ~(stop_on_finish & finished)

    def body(carry: tuple[engine.DecodeState, Array]) -> tuple[engine.DecodeState, Array]:
        st, i = carry
        return engine.step(params, st, threshold, spec=spec), i + 1

    return jax.lax.while_loop(cond, body, (state, jnp.int32(0)))[0]


def empty_state(row: Any, slots: int) -> engine.DecodeState:
    """A ``DecodeState`` of ``slots`` free rows shaped like ``row`` (an abstract one-row state)."""

    def zeros(path: tuple[Any, ...], leaf: Any) -> Array:
        axis = 1 if engine.is_stacked(path) else 0
        shape = (*leaf.shape[:axis], slots, *leaf.shape[axis + 1:])
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), slots)
        return jnp.zeros(shape, leaf.dtype)

    state = jax.tree_util.tree_map_with_path(zeros, row)
    return state.replace(done=jnp.ones((slots,), bool))


class ContinuousDecoder:
    """Continuous batching of one ``DecodeSpec`` over ``slots`` decode slots.

    ``run`` decodes any number of requests and returns one ``RowResult`` each, in order. The
    programs are compiled once per spec (the prefill once per prompt-width bucket and cache
    size).
    """

    def __init__(self, spec: engine.DecodeSpec, slots: int, sync_steps: int = 32) -> None:
        if slots <= 0 or sync_steps <= 0:
            raise ValueError(f"slots and sync_steps must be positive, got {slots}, {sync_steps}")
        self.spec, self.slots, self.sync_steps = spec, slots, sync_steps
        self._fill = jax.jit(functools.partial(engine.fill, spec=spec),
                             static_argnames="slots")
        self._first = jax.jit(functools.partial(engine.first_emit, spec=spec))
        self._insert = jax.jit(insert_row, donate_argnums=(0,))
        self._release = jax.jit(release_row, donate_argnums=(0,))
        self._take = jax.jit(take_row)
        self._run = jax.jit(functools.partial(run_steps, spec=spec), donate_argnums=(1,))

    def _prepare(self, ids: Sequence[int], bucket: int,
                 max_context: int) -> tuple[np.ndarray, np.ndarray]:
        return engine.prepare_prompts([ids], self.spec.pipo, self.spec.pad_id, bucket,
                                      self.spec.budget, max_context)

    def _width(self, tokens: np.ndarray) -> int:
        """Cache positions of a prepared prompt after ``fill`` rounds it to whole chunks."""
        width = tokens.shape[1] // 2 if self.spec.pipo else tokens.shape[1]
        chunk = min(self.spec.chunk, width)
        return width + (-width % chunk)

    def run(self, params: Params, prompts: Sequence[Sequence[int]], seeds: Sequence[int],
            threshold: float, *, bucket: int, max_context: int, progress: bool = False,
            on_done: Callable[[int, RowResult], None] | None = None) -> list[RowResult]:
        """Decodes every prompt (token ids) with its own seed; a prompt that is empty or does
        not fit the context with the budget is refused alone (``RowResult.error``).
        ``on_done(i, result)`` is called as each request finishes (in finishing order)."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        results: list[RowResult | None] = [None] * len(prompts)
        prepared: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, ids in enumerate(prompts):
            try:
                prepared[i] = self._prepare(ids, bucket, max_context)
            except PromptError as e:
                results[i] = RowResult(error=f"request {i}: {e}")
                continue
            groups.setdefault(tuple(int(t) for t in ids), []).append(i)
        bar = tqdm(total=len(prompts), desc="decode", unit="request", disable=not progress)

        def finish(i: int, res: RowResult) -> None:
            results[i] = res
            bar.update(1)
            if on_done is not None:
                on_done(i, res)

        for i, res in enumerate(results):
            if res is not None:
                finish(i, res)
        if not prepared:
            bar.close()
            return [r for r in results if r is not None]
        slots = self.spec.slots(max(self._width(t) for t, _ in prepared.values()))
        thr = np.float32(threshold)
        # Admission order: each prompt's samples together, so one prefill serves them all.
        queue = [i for members in groups.values() for i in members]
        shared: tuple[tuple[int, ...], engine.Prefilled] | None = None
        state: engine.DecodeState | None = None
        occupant: dict[int, tuple[int, float, float]] = {}  # slot → (request, t0, t_first)
        free = list(range(self.slots))
        pos = 0
        while pos < len(queue) or occupant:
            while free and pos < len(queue):
                i = queue[pos]
                pos += 1
                t0 = time.perf_counter()
                key = tuple(int(t) for t in prompts[i])
                if shared is None or shared[0] != key:
                    tokens, valid = prepared[i]
                    shared = (key, self._fill(params, tokens, valid, slots=slots))
                row = self._first(params, shared[1], request_keys([seeds[i]]), thr)
                if state is None:
                    state = jax.device_put(empty_state(jax.eval_shape(lambda r: r, row),
                                                       self.slots))
                if bool(jax.device_get(row.done)[0]):  # ended at its first output
                    t1 = time.perf_counter()
                    finish(i, self._result(jax.device_get(self._take(row, 0)), t1 - t0, 0.0))
                    continue
                slot = free.pop(0)
                state = self._insert(state, row, np.int32(slot))
                jax.block_until_ready(state.out)
                occupant[slot] = (i, t0, time.perf_counter())
            if not occupant:
                continue
            assert state is not None
            state = self._run(params, state, thr, np.int32(self.sync_steps),
                              np.bool_(pos < len(queue)))
            done = np.asarray(jax.device_get(state.done))
            now = time.perf_counter()
            for slot in sorted(s for s in occupant if done[s]):
                i, t0, t1 = occupant.pop(slot)
                host = jax.device_get(self._take(state, np.int32(slot)))
                state = self._release(state, np.int32(slot))
                free.append(slot)
                finish(i, self._result(host, t1 - t0, now - t1))
        bar.close()
        return [r for r in results if r is not None]

    @staticmethod
    def _result(host: dict[str, Any], ttft: float, decode: float) -> RowResult:
        return RowResult(out=np.asarray(host["out"]), ttft=ttft, decode=decode,
                         **{f: int(host[f]) for f in STAT_FIELDS})
