"""Parity with the PyTorch reference (``transformers``) on tiny, fully randomised models.

* full-sequence logits of the backbone vs ``Qwen3_5ForCausalLM`` / ``Qwen3ForCausalLM``
  (tied and untied heads; Qwen3.5 sequences span three 64-token DeltaNet chunks);
* our prefill + single-token decode (``pipo_jax.decode.engine``) vs the HF full forward, with a
  left-padded row;
* our MTP head vs HF's generic ``MtpModel`` (the structure of Qwen3.5's native ``mtp.*``);
* the key tables: exact round trip of every tensor, and ``load_into``'s errors.

All float32 on CPU; logits must agree to 1e-4 absolute (they are O(5)).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_reference as ref  # noqa: E402  (needs torch)

from pipo_jax.io.hf import mapping as hm  # noqa: E402
from pipo_jax.model.pipo import PipoLM  # noqa: E402

torch.set_num_threads(1)

ATOL = 1e-4
B, T = 2, 150  # 150 tokens: three DeltaNet chunks of 64, the last one partial
PROMPT, STEPS, LEFT_PAD = 134, 16, 5
PAD_ID = 7  # a real token id, so the padded positions carry a non-zero embedding
CASES = [("qwen3_5", False), ("qwen3_5", True), ("qwen3", False), ("qwen3", True)]


def _close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    diff = float(np.max(np.abs(got - want)))
    print(f"{what}: max |Δ| {diff:.2e} (max |ref| {np.max(np.abs(want)):.2f})")
    assert diff <= ATOL, f"{what}: max |Δ| {diff:.3e} > {ATOL}"


class Case:
    """One randomised HF model, its checkpoint, our config and loaded parameters."""

    def __init__(self, family, tie):
        self.family, self.tie = family, tie
        self.hf = ref.build(family, tie)
        self.cfg = hm.config_from_hf(self.hf.config.to_dict())
        self.ckpt = ref.checkpoint(self.hf)
        self.params = ref.empty_tree(self.cfg, pipo=False)
        assert hm.load_into(self.cfg, self.ckpt.items(), self.params) == {"backbone"}
        assert not any(np.isnan(x).any() for x in jax.tree.leaves(self.params)), \
            "load_into left a parameter unwritten"
        self.ids = np.random.default_rng(0).integers(0, self.cfg.vocab_size, (B, T))
        with torch.no_grad():
            self.ref_logits = self.hf(torch.tensor(self.ids)).logits.numpy()

        cfg = self.cfg
        self.forward = jax.jit(
            lambda p, t: PipoLM(cfg, False).apply({"params": p}, t)["h"])
        ar = PipoLM(cfg, False)
        self.logits = jax.jit(lambda p, h: ar.apply({"params": p}, h, method=PipoLM.logits))
        # The model's own decode methods, as the decoder calls them.
        self.prefill = jax.jit(lambda p, *a: ar.apply({"params": p}, *a, method=PipoLM.prefill),
                               static_argnums=(3, 4))
        self.step = jax.jit(lambda p, *a: ar.apply({"params": p}, *a, method=PipoLM.step))


@pytest.fixture(scope="module")
def cases():
    """``cases(family, tie)``: each HF model is built (and run) once per module."""
    built = {}

    def get(family, tie):
        if (family, tie) not in built:
            built[family, tie] = Case(family, tie)
        return built[family, tie]

    return get


def _name(family, tie):
    return f"{family}-{'tied' if tie else 'untied'}"


@pytest.mark.parametrize("family,tie", CASES, ids=[_name(*c) for c in CASES])
def test_config_from_hf(cases, family, tie):
    c = cases(family, tie)
    cfg = c.cfg
    assert cfg.family == family and cfg.tie_embeddings == tie
    if family == "qwen3_5":
        assert cfg.layer_pattern == ("linear_attention",) * 3 + ("full_attention",)
        assert cfg.n_blocks == 2 and cfg.rotary_dim == 8 and cfg.rope_theta == 2e4
        assert cfg.linear_chunk == 64 and T > 2 * cfg.linear_chunk
    else:
        assert cfg.layer_pattern == ("full_attention",) and cfg.n_blocks == 4
        assert cfg.rotary_dim == cfg.head_dim and cfg.rope_theta == 1e6


@pytest.mark.parametrize("family,tie", CASES, ids=[_name(*c) for c in CASES])
def test_full_sequence_logits_match_hf(cases, family, tie):
    c = cases(family, tie)
    h = c.forward(c.params, jnp.asarray(c.ids))  # B × (T-1) × H: the last token has no target
    _close(c.logits(c.params, h), c.ref_logits[:, :-1], f"{_name(family, tie)} forward")


@pytest.mark.parametrize("family,tie", [("qwen3_5", False), ("qwen3", True)],
                         ids=["qwen3_5-untied", "qwen3-tied"])
def test_prefill_then_decode_matches_hf_full_forward(cases, family, tie):
    """Row 0 prefills ``PROMPT`` tokens; row 1 is left-padded by ``LEFT_PAD`` (its own positions
    start at 0). Then ``STEPS`` forced single-token steps; every position's logits must equal HF's
    full forward of the unpadded sequence, so padding neither moved the RoPE positions nor
    touched the DeltaNet conv/recurrent states."""
    c = cases(family, tie)
    ids = c.ids
    prompt = np.stack([ids[0, :PROMPT],
                       np.concatenate([np.full(LEFT_PAD, PAD_ID), ids[1, :PROMPT - LEFT_PAD]])])
    valid = np.ones((B, PROMPT), bool)
    valid[1, :LEFT_PAD] = False
    _, h_all, cache, pos = c.prefill(c.params, jnp.asarray(prompt, jnp.int32),
                                     jnp.asarray(valid), PROMPT + STEPS, False)
    np.testing.assert_array_equal(pos, [PROMPT, PROMPT - LEFT_PAD])
    name = _name(family, tie)
    logits = np.asarray(c.logits(c.params, h_all))
    _close(logits[0], c.ref_logits[0, :PROMPT], f"{name} prefill row 0")
    _close(logits[1, LEFT_PAD:], c.ref_logits[1, :PROMPT - LEFT_PAD],
           f"{name} prefill row 1 (left-padded)")

    starts = np.array([PROMPT, PROMPT - LEFT_PAD])
    got, want = [], []
    for j in range(STEPS):
        tok = ids[np.arange(B), starts + j][:, None]
        logits, _, cache = c.step(c.params, jnp.asarray(tok, jnp.int32), pos, cache)
        cache = cache.next_slot(jnp.ones((B,), bool))
        pos = pos + 1
        got.append(np.asarray(logits))
        want.append(c.ref_logits[np.arange(B), starts + j])
    _close(np.stack(got), np.stack(want), f"{name} {STEPS} decode steps")


def test_mtp_head_matches_hf_mtp_model(cases):
    """Our MTPHead (loaded from ``mtp.*`` keys) vs HF's ``MtpModel.forward_layer`` + shared head,
    on the main model's post-norm hidden states and the next tokens. (Untied: the MTP logits
    must come from ``lm_head``, not the embedding.)"""
    tie = False
    c = cases("qwen3_5", tie)
    mtp = ref.build_mtp(c.hf)
    mtp_ckpt = ref.mtp_checkpoint(mtp)
    assert len(mtp_ckpt) == 4 + 11  # fc + 3 norms, and one full-attention decoder layer
    params = ref.empty_tree(c.cfg, pipo=True)
    groups = hm.load_into(c.cfg, list(c.ckpt.items()) + list(mtp_ckpt.items()), params)
    assert groups == {"backbone", "mtp"}
    assert not any(np.isnan(x).any() for x in jax.tree.leaves(params["mtp_head"]))

    n = 40
    ids = torch.tensor(c.ids[:, :n])
    position_ids = torch.arange(n - 1)[None].expand(B, n - 1)
    with torch.no_grad():
        h = c.hf.model(ids).last_hidden_state[:, :-1]  # post final norm
        want_m = mtp.forward_layer(0, h, position_ids, None, input_ids=ids[:, 1:])
        want_logits = mtp.shared_head(want_m)

    def run(m, h, tok1, positions):
        out, _ = m.mtp_head(h, m.embedder(tok1), positions)
        return out, m.logits(out)

    got_m, got_logits = jax.jit(lambda p, *a: PipoLM(c.cfg, True).apply(
        {"params": p}, *a, method=run))(params, h.numpy(), c.ids[:, 1:n],
                                        position_ids.numpy())
    name = _name("qwen3_5", tie)
    _close(got_m, want_m.numpy(), f"{name} MTP hidden")
    _close(got_logits, want_logits.numpy(), f"{name} MTP logits")

    # The MTP group exports back to exactly the tensors it was loaded from.
    exported = dict(hm.iter_hf_tensors(c.cfg, params, groups=("mtp",)))
    assert exported.keys() == mtp_ckpt.keys()
    for key, value in mtp_ckpt.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


@pytest.mark.parametrize("family,tie", CASES, ids=[_name(*c) for c in CASES])
def test_key_table_round_trip_is_exact(cases, family, tie):
    """``iter_hf_tensors`` reproduces every HF tensor bit for bit, under the export spelling
    (``model.language_model.*`` for Qwen3.5, ``model.*`` for Qwen3)."""
    c = cases(family, tie)
    prefix = "model.language_model." if family == "qwen3_5" else "model."
    want = {(prefix + k[len("model."):] if k.startswith("model.") else k): v
            for k, v in c.ckpt.items()}
    got = dict(hm.iter_hf_tensors(c.cfg, c.params, groups=("backbone",)))
    assert got.keys() == want.keys()
    assert ("lm_head.weight" in got) == (not tie)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


# ------------------------------------------------------------------------------ load_into errors


@pytest.fixture(scope="module")
def qwen35(cases):
    return cases("qwen3_5", False)


def _load(c, items, pipo=False):
    params = ref.empty_tree(c.cfg, pipo)
    return hm.load_into(c.cfg, items, params), params


def _mtp_items(c):
    """Every ``mtp.*`` key with the right shape (values irrelevant)."""
    return dict(hm.iter_hf_tensors(c.cfg, ref.empty_tree(c.cfg, True), groups=("mtp",)))


def test_load_into_rejects_unused_key(qwen35):
    bad = "model.layers.0.linear_attn.bogus.weight"
    items = {**qwen35.ckpt, bad: np.zeros((3,), np.float32)}
    with pytest.raises(hm.MappingError, match=bad):
        _load(qwen35, items.items())


def test_load_into_rejects_missing_backbone_key(qwen35):
    items = dict(qwen35.ckpt)
    del items["model.layers.5.linear_attn.dt_bias"]
    with pytest.raises(hm.MappingError, match=r"backbone.*layers\.5\.linear_attn\.dt_bias"):
        _load(qwen35, items.items())


def test_load_into_rejects_partial_mtp_group(qwen35):
    mtp = _mtp_items(qwen35)
    missing = "mtp.layers.0.self_attn.k_norm.weight"
    del mtp[missing]
    with pytest.raises(hm.MappingError, match=r"lacks 1 mtp key.*" + missing.replace(".", r"\.")):
        _load(qwen35, list(qwen35.ckpt.items()) + list(mtp.items()), pipo=True)
    # A lone mtp tensor is partial too.
    with pytest.raises(hm.MappingError, match="mtp"):
        _load(qwen35, list(qwen35.ckpt.items()) + [("mtp.fc.weight", mtp["mtp.fc.weight"])],
              pipo=True)


@pytest.mark.parametrize("key,reshape", [
    ("model.layers.0.linear_attn.in_proj_qkv.weight", lambda x: x.T),
    ("model.layers.3.self_attn.q_proj.weight", lambda x: x[:-1]),
    ("model.layers.3.self_attn.k_norm.weight", lambda x: x[:-1]),
    ("lm_head.weight", lambda x: x[:, :-1]),
    pytest.param("model.layers.3.self_attn.q_proj.weight", lambda x: x.T),
    pytest.param("model.layers.7.self_attn.o_proj.weight", lambda x: x.T),
    pytest.param("model.layers.0.linear_attn.conv1d.weight", lambda x: x[:, 0]),
    pytest.param("model.layers.0.linear_attn.conv1d.weight",
                 lambda x: np.concatenate([x, x], axis=1)),
], ids=["transposed", "short-rows", "norm", "lm_head", "q_proj-transposed",
        "o_proj-transposed", "conv-squeezed", "conv-two-channels"])
def test_load_into_rejects_wrong_shape(qwen35, key, reshape):
    items = {**qwen35.ckpt, key: np.ascontiguousarray(reshape(qwen35.ckpt[key]))}
    with pytest.raises(hm.MappingError, match=key.replace(".", r"\.")):
        _load(qwen35, items.items())


def test_load_into_rejects_duplicate_spellings(qwen35):
    key = "model.norm.weight"
    items = list(qwen35.ckpt.items()) + [("model.language_model.norm.weight", qwen35.ckpt[key])]
    with pytest.raises(hm.MappingError, match="twice"):
        _load(qwen35, items)


def test_load_into_accepts_both_prefixes_and_ignores_visual(qwen35):
    """``model.X`` (in-memory state_dict) and ``model.language_model.X`` (official VLM
    checkpoints, with ``model.visual.*`` beside them) load into identical trees."""
    official = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
                for k, v in qwen35.ckpt.items()}
    official["model.visual.blocks.0.attn.qkv.weight"] = np.zeros((5, 3), np.float32)
    official["model.visual.merger.bogus"] = np.zeros((2,), np.float32)
    groups, params = _load(qwen35, official.items())
    assert groups == {"backbone"}
    jax.tree.map(np.testing.assert_array_equal, params, qwen35.params)


def test_load_into_accepts_tied_head_only_if_it_is_the_embedding(cases):
    """A tied model's in-memory state_dict lists ``lm_head.weight``: fine when it is the
    embedding, an error when it is not (the config would silently drop a trained head)."""
    c = cases("qwen3_5", True)
    emb = next(v for k, v in c.ckpt.items() if k.endswith("embed_tokens.weight"))
    _load(c, list(c.ckpt.items()) + [("lm_head.weight", emb.copy())])
    with pytest.raises(hm.MappingError, match="tie_word_embeddings"):
        _load(c, list(c.ckpt.items()) + [("lm_head.weight", emb + 1.0)])
