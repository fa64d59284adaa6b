"""The measurements ``test_multidevice.py`` checks, taken on 8 simulated CPU devices.

Run by the test in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(the flag must be set before JAX starts, so it cannot run inside the pytest process):

    python tests/multidevice_worker.py OUT.json WORK_DIR

For the meshes ``(data, fsdp, tensor)`` in ``MESHES`` and for one device it runs one SFT step
and an OPD rollout (on one device and ``(2, 2, 2)`` also the OPD scoring and update) with the
stages' own compiled programs and records their loss, gradient norm and gradients (AdamW's
first moment after the step), the rollout, the parameters' shardings and per-device bytes;
then it saves the (1, 8, 1) state and restores it on one device and on (2, 2, 2), and decodes
greedily with both.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipo_jax.config import Config, MeshConfig, load_config  # noqa: E402
from pipo_jax.data.loader import make_prompt_dataset, make_train_dataset  # noqa: E402
from pipo_jax.decode.runner import PipoRunner  # noqa: E402
from pipo_jax.io import checkpoint as ckpt  # noqa: E402
from pipo_jax.io.run_dir import abstract_params, restore_stage_params  # noqa: E402
from pipo_jax.io.tokenizer import ByteTokenizer  # noqa: E402
from pipo_jax.model import sharding  # noqa: E402
from pipo_jax.model.pipo import init_params, lm_head  # noqa: E402
from pipo_jax.train.opd import OpdStep  # noqa: E402
from pipo_jax.train.state import TrainState, make_optimizer, state_shardings  # noqa: E402
from pipo_jax.train.supervised import jit_train_step  # noqa: E402

MESHES = ((8, 1, 1), (2, 2, 2), (1, 8, 1))
# Parameters whose placement the test checks against the rules table.
WATCHED = {"embedding": ("embedder", "embedding"),
           "mlp_gate": ("backbone", "layers", "layer_1", "mlp", "gate_proj", "kernel"),
           "attn_q": ("backbone", "layers", "layer_1", "attn", "q_proj", "kernel"),
           "compressor_fc1": ("compressor", "fc1", "kernel")}


def mesh_of(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    n = int(np.prod(shape))
    return sharding.build_mesh(MeshConfig(*shape), jax.devices()[:n])


def leaf(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def device0_bytes(tree: Any) -> int:
    """Bytes the first device holds of ``tree``'s arrays."""
    dev = jax.devices()[0]
    return int(sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
                   if s.device == dev))


def host(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x, dtype=np.float64), sharding.to_host(tree))


def flat(tree: Any) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(host(tree))}


def adam_mu(opt_state: Any) -> Any:
    """AdamW's first moment: after one step from zero it is ``(1 - b1) ·`` the clipped
    gradient, so equal moments mean equal gradients."""
    return optax.tree_utils.tree_get(opt_state, "mu")


def measure(cfg: Config, mesh: jax.sharding.Mesh, start: dict[str, Any],
            batch_np: dict[str, np.ndarray], prompts: list[list[int]],
            rows_np: dict[str, np.ndarray] | None, update: bool = True,
            ) -> tuple[dict[str, Any], TrainState, Any]:
    """One SFT step and an OPD rollout on ``mesh`` with the stages' own compiled programs, from
    the host copies in ``start`` (student ``params``, ``teacher``, ``opt_state``), and with
    ``update`` the OPD teacher scoring and update too. The update runs on ``rows_np`` (the
    one-device rollout) when given, so every mesh scores the same rows. Returns the
    measurements, the state after the SFT step and the rollout rows."""
    tok = ByteTokenizer()
    tx = make_optimizer(cfg.sft)
    _, sh = state_shardings(cfg.model, True, tx, mesh)
    teacher_sh = jax.tree.map(lambda a: a.sharding,
                              abstract_params(cfg.teacher_model, False, mesh))
    out: dict[str, Any] = {"seconds": {}}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        out["seconds"][name] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()

    def fresh_state() -> TrainState:
        return TrainState(step=jnp.int32(0), params=jax.device_put(start["params"], sh.params),
                          opt_state=jax.device_put(start["opt_state"], sh.opt_state))

    with jax.set_mesh(mesh):
        teacher = jax.device_put(start["teacher"], teacher_sh)
        state = fresh_state()
        out["specs"] = {name: str(leaf(state.params, path).sharding.spec)
                        for name, path in WATCHED.items()}
        out["param_bytes_device0"] = device0_bytes(state.params)
        out["opt_bytes_device0"] = device0_bytes(state.opt_state)

        # SFT: the stage's jitted training step (learning rate 0 at step 0: warm-up).
        batch = sharding.global_batch(batch_np, mesh)
        state, metrics = jit_train_step(cfg, "sft", tx, mesh, sh)(state, batch)
        out["sft"] = {k: float(metrics[k]) for k in ("loss", "grad_norm")}
        out["sft_grads"] = flat(adam_mu(state.opt_state))
        lap("sft_step")

        # OPD: rollout, teacher scoring and update, each the stage's compiled program.
        step = OpdStep(cfg, tok, cfg.teacher_model, make_optimizer(cfg.opd), mesh)
        opd_state = fresh_state()
        rows = step.rollout(opd_state.params, prompts, 0)
        out["rollout_tokens"] = np.asarray(sharding.to_host(rows["tokens"])).tolist()
        out["rollout_sharding"] = str(rows["tokens"].sharding.spec)
        rows_host = sharding.to_host(rows)
        lap("rollout")
        if not update:
            return out, state, rows_host
        if rows_np is not None:
            rows = sharding.global_batch(rows_np, mesh)
        scored = step.score(teacher, rows["tokens"])
        opd_state, metrics = step.update(opd_state, rows, scored, lm_head(teacher))
        out["opd"] = {k: float(metrics[k]) for k in ("loss", "grad_norm")}
        out["opd_grads"] = flat(adam_mu(opd_state.opt_state))
        lap("opd_score_update")
    return out, state, rows_host


def main(out_path: str, work: str) -> None:
    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 devices, got {jax.device_count()}; set XLA_FLAGS="
                         "--xla_force_host_platform_device_count=8")
    cfg = load_config(REPO / "configs" / "micro.yaml", [
        f"run_dir={work}/run", f"data.data_dir={work}/tfds", "sft.batch_size=8",
        # Wide initial weights: greedy decode of the random model then varies from token to
        # token, so that equal decodes on two meshes mean something.
        "model.init_std=0.5",
        "opd.batch_size=8", "opd.rollout_max_new_tokens=16", "opd.row_bucket=64"])
    tok = ByteTokenizer()
    batch_np = {k: v for k, v in make_train_dataset(cfg, tok, "sft")[0].items()
                if k in ("tokens", "loss_mask")}
    prompts = make_prompt_dataset(cfg, tok)[0]["prompts"]
    # Starting weights on the host. The sharded initialisation the stages use is checked
    # against them on (2, 2, 2).
    params = jax.jit(lambda r: nn.unbox(init_params(cfg.model, True, r)))(jax.random.key(0))
    start = {"params": sharding.to_host(params),
             "teacher": sharding.to_host(jax.jit(lambda r: nn.unbox(
                 init_params(cfg.teacher_model, False, r)))(jax.random.key(1))),
             "opt_state": sharding.to_host(make_optimizer(cfg.sft).init(params))}
    mesh = mesh_of((2, 2, 2))
    _, sh = state_shardings(cfg.model, True, make_optimizer(cfg.sft), mesh)
    with jax.set_mesh(mesh):
        sharded_init = jax.jit(lambda r: nn.unbox(init_params(cfg.model, True, r)),
                               out_shardings=sh.params)(jax.random.key(0))
    init_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(start["params"]), jax.tree.leaves(sharding.to_host(sharded_init)),
        strict=True))
    results: dict[str, Any] = {}
    one, _, rows_np = measure(cfg, mesh_of((1, 1, 1)), start, batch_np, prompts, None)
    results["1x1x1"] = one
    states = {}
    for shape in MESHES:
        name = "x".join(map(str, shape))
        results[name], states[name], _ = measure(cfg, mesh_of(shape), start, batch_np, prompts,
                                                 rows_np, update=shape == (2, 2, 2))

    # Save the (1, 8, 1) state; restore it on one device and on (2, 2, 2).
    stage_dir = Path(work) / "run" / "sft"
    with ckpt.open_manager(stage_dir, keep=2) as manager:
        ckpt.save(manager, 1, states["1x8x1"], cfg, "sft", wait=True)
    restored = {}
    for shape in ((1, 1, 1), (2, 2, 2)):
        mesh = mesh_of(shape)
        params, _ = restore_stage_params(stage_dir, True, mesh)
        tx = make_optimizer(cfg.sft)
        abstract, sh = state_shardings(cfg.model, True, tx, mesh)
        state, _ = ckpt.restore(stage_dir, ckpt.abstract_target(abstract, sh))
        runner = PipoRunner(cfg, params, None, tok, mesh=None if shape == (1, 1, 1) else mesh)
        gens = runner.generate(["What is 12 + 34?", "What is 5 + 71?", "What is 40 + 40?"],
                               threshold=0.7, temperature=0.0, max_new_tokens=16)
        restored["x".join(map(str, shape))] = {
            "params": flat(params), "opt_state": flat(state.opt_state),
            "embedding_spec": str(params["embedder"]["embedding"].sharding.spec),
            "devices": len(params["embedder"]["embedding"].sharding.device_set),
            "decode": [g.tokens for g in gens]}
    saved = {"params": flat(states["1x8x1"].params),
             "opt_state": flat(states["1x8x1"].opt_state)}

    def diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
        assert a.keys() == b.keys()
        return max(float(np.max(np.abs(a[k] - b[k]))) if a[k].size else 0.0 for k in a)

    def rel_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
        scale = max(float(np.max(np.abs(v))) for v in b.values() if v.size)
        return diff(a, b) / scale

    report: dict[str, Any] = {"meshes": {}, "restore": {}, "sharded_init_diff": init_diff}
    for name, r in results.items():
        report["meshes"][name] = {
            "sft": r["sft"], "sft_grads_rel_diff": rel_diff(r["sft_grads"], one["sft_grads"]),
            **({"opd": r["opd"], "opd_grads_rel_diff": rel_diff(r["opd_grads"], one["opd_grads"])}
               if "opd" in r else {}),
            "rollout_equal": r["rollout_tokens"] == one["rollout_tokens"],
            "rollout_sharding": r["rollout_sharding"],
            "specs": r["specs"], "param_bytes_device0": r["param_bytes_device0"],
            "opt_bytes_device0": r["opt_bytes_device0"], "seconds": r["seconds"]}
    for name, r in restored.items():
        report["restore"][name] = {
            "params_diff": diff(r["params"], saved["params"]),
            "opt_state_diff": diff(r["opt_state"], saved["opt_state"]),
            "embedding_spec": r["embedding_spec"], "devices": r["devices"],
            "decode": r["decode"]}
    Path(out_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
