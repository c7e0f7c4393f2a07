"""CLIP and T5 text encoders: parity against transformers, conversion round trips, strict errors, bf16."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from conversion import clip as clip_conv
from conversion import t5 as t5_conv
from conversion.safetensors_io import ConversionError
from flowsteer_jax.models.loading import clip_state_dict, load_clip, load_t5, save_clip, save_t5, t5_state_dict
from flowsteer_jax.models.text.clip import CLIPText
from flowsteer_jax.models.text.clip import CLIPTextConfig as OurCLIPConfig
from flowsteer_jax.models.text.t5 import T5Config as OurT5Config
from flowsteer_jax.models.text.t5 import T5Encoder, relative_position_bucket
from tests.torch_reference import randomize_, rel_err, to_np

VOCAB = 64
CLIP_TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=16,
    projection_dim=24,
    bos_token_id=VOCAB - 2,
    pad_token_id=1,
)
T5_TINY = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=12,  # heads * d_kv = 48 != d_model: q/k/v/o are not square
    d_ff=40,
    num_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,  # < the test sequence: the log-spaced and the clamped buckets both occur
)


def tiny_clip(projection: bool, eos_token_id: int, hidden_act: str, seed: int = 0):
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(**CLIP_TINY, eos_token_id=eos_token_id, hidden_act=hidden_act)
    return randomize_(cls(cfg).eval(), seed)


def tiny_t5(feed_forward_proj: str = "gated-gelu", seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    return randomize_(T5EncoderModel(T5Config(**T5_TINY, feed_forward_proj=feed_forward_proj)).eval(), seed)


def clip_ids(eos: int, pad: int, seed: int = 1, n: int = 16) -> np.ndarray:
    """CLIP-like batches: BOS, words, EOS at a different place per row, then padding."""
    r = np.random.default_rng(seed)
    ids = r.integers(2, VOCAB - 8, (4, n))
    ids[:, 0] = VOCAB - 2
    for row, end in enumerate((3, 9, n - 1, 6)):
        ids[row, end] = eos
        ids[row, end + 1 :] = pad
    ids[3, 11] = VOCAB - 3  # a word after the padding: argmax pooling and first-EOS pooling disagree on it
    return ids


CLIP_CASES = [
    # (projection, eos_token_id, hidden_act, eos written in ids, pad, shard size)
    (True, 2, "quick_gelu", VOCAB - 1, VOCAB - 1, None),  # SD3's CLIP-L: legacy argmax pooling, pad = EOS
    (True, VOCAB - 1, "gelu", VOCAB - 1, 0, "8KB"),  # SD3's CLIP-G: explicit EOS id, pad "!"
    (False, VOCAB - 10, "gelu_new", VOCAB - 10, VOCAB - 10, None),  # bare CLIPTextModel, EOS not the largest id
]


@pytest.mark.parametrize("projection,eos_id,act,eos,pad,shard", CLIP_CASES)
def test_clip_parity_with_transformers(tmp_path, projection, eos_id, act, eos, pad, shard):
    ref = tiny_clip(projection, eos_id, act)
    ref.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert any(n.endswith(".index.json") for n in os.listdir(tmp_path)) == bool(shard)
    ours = load_clip(str(tmp_path))
    ids = clip_ids(eos, pad)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), output_hidden_states=True)
    got = nnx.jit(lambda m, x: m(x))(ours, ids)
    assert len(got.hidden_states) == len(want.hidden_states) == CLIP_TINY["num_hidden_layers"] + 1
    errs = {
        f"hidden_states[{i}]": rel_err(a, to_np(b))
        for i, (a, b) in enumerate(zip(got.hidden_states, want.hidden_states, strict=True))
    }
    errs["last_hidden_state"] = rel_err(got.last_hidden_state, to_np(want.last_hidden_state))
    if projection:
        errs["text_embeds"] = rel_err(got.text_embeds, to_np(want.text_embeds))
    else:
        assert got.text_embeds is None
        errs["pooler_output"] = rel_err(got.pooler_output, to_np(want.pooler_output))
    print(f"max relative error {max(errs.values()):.2e}")
    assert max(errs.values()) <= 1e-5, errs


@pytest.mark.parametrize("feed_forward_proj,shard", [("gated-gelu", "8KB"), ("relu", None)])
def test_t5_parity_with_transformers(tmp_path, feed_forward_proj, shard):
    ref = tiny_t5(feed_forward_proj)
    ref.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    ours = load_t5(str(tmp_path))
    r = np.random.default_rng(2)
    ids = r.integers(0, VOCAB, (2, 40))
    mask = np.ones_like(ids)
    mask[1, 25:] = 0
    run = nnx.jit(lambda m, x, a: m(x, a))
    for attention_mask in (None, mask):
        with torch.no_grad():
            kw = {} if attention_mask is None else {"attention_mask": torch.from_numpy(attention_mask)}
            want = ref(torch.from_numpy(ids), output_hidden_states=True, **kw)
        got = run(ours, ids, attention_mask)
        errs = [rel_err(a, to_np(b)) for a, b in zip(got.hidden_states, want.hidden_states, strict=True)]
        errs.append(rel_err(got.last_hidden_state, to_np(want.last_hidden_state)))
        print(f"max relative error {max(errs):.2e} (mask: {attention_mask is not None})")
        assert max(errs) <= 1e-5, errs


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-700, 701)
    for num_buckets, max_distance in [(32, 128), (8, 12), (16, 20), (64, 256)]:
        want = T5Attention._relative_position_bucket(
            torch.from_numpy(rel), bidirectional=True, num_buckets=num_buckets, max_distance=max_distance
        ).numpy()
        np.testing.assert_array_equal(relative_position_bucket(rel, num_buckets, max_distance), want)


@pytest.mark.parametrize("torch_dtype,jnp_dtype", [(torch.bfloat16, jnp.bfloat16), (torch.float16, jnp.float16)])
def test_t5_half_precision_stays_half_and_finite(tmp_path, torch_dtype, jnp_dtype):
    """Half weights stay half, and a T5 whose residual stream exceeds fp16's range (as T5-XXL's does) gives
    finite outputs close to float32: the residual stream and the norms run in float32."""
    ref = tiny_t5()
    with torch.no_grad():  # large FFN outputs, so a large residual stream
        for block in ref.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(30000.0)
    half = T5EncoderModel(ref.config).to(torch_dtype).eval()
    half.load_state_dict({k: v.to(torch_dtype) for k, v in ref.state_dict().items()})
    half.save_pretrained(tmp_path, max_shard_size="8KB")
    ours = load_t5(str(tmp_path), jnp_dtype)
    for k, v in t5_state_dict(ours).items():
        assert v.dtype == jnp_dtype, k
    ids = np.random.default_rng(3).integers(0, VOCAB, (2, 24))
    with torch.no_grad():  # the float32 truth, from the same rounded weights
        ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
        truth = ref(torch.from_numpy(ids), output_hidden_states=True)
    assert np.abs(to_np(truth.hidden_states[-2])).max() > 65504  # would be inf in an fp16 residual stream
    want = to_np(truth.last_hidden_state)
    # XLA:CPU cannot compile an fp16 dot with fp32 accumulation (attention logits); eagerly it falls back
    forward = nnx.jit(lambda m, x: m(x)) if jnp_dtype == jnp.bfloat16 else (lambda m, x: m(x))
    got = forward(ours, ids).last_hidden_state
    assert got.dtype == jnp_dtype
    got = np.asarray(got, np.float32)
    assert np.isfinite(got).all()
    mean_err = lambda a: float(np.abs(a - want).mean() / np.abs(want).mean())  # noqa: E731
    print(f"{jnp_dtype.__name__}: max relative error {rel_err(got, want):.2e}, mean {mean_err(got):.2e}")
    if jnp_dtype == jnp.float16:
        assert rel_err(got, want) <= 1e-2
    else:  # bf16 rounds every matmul operand to 8 bits: as good as transformers' bf16 forward, not better
        with torch.no_grad():
            theirs = to_np(half(torch.from_numpy(ids)).last_hidden_state)
        assert rel_err(got, want) <= 5e-2 and mean_err(got) <= mean_err(theirs)


def test_clip_round_trip_is_bit_exact_and_loadable(tmp_path):
    ref = tiny_clip(True, 2, "quick_gelu")
    ref.save_pretrained(tmp_path / "in")
    ours = load_clip(str(tmp_path / "in"))
    state = clip_state_dict(ours)
    ref_state = ref.state_dict()
    assert set(state) == set(ref_state)
    for k, v in ref_state.items():
        assert state[k].dtype == np.float32 and np.array_equal(state[k], v.numpy()), k
    save_clip(ours, str(tmp_path / "out"), max_shard_bytes=4096)
    back = CLIPTextModelWithProjection.from_pretrained(tmp_path / "out")
    assert back.config.eos_token_id == 2 and back.config.hidden_act == "quick_gelu"
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_clip_text_model_loads_with_or_without_text_model_prefix(tmp_path):
    """transformers 5 saves a bare CLIPTextModel without `text_model.`; 4.x checkpoints (SD1.x) keep it."""
    ref = tiny_clip(False, VOCAB - 1, "quick_gelu")
    ref.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    assert not any(k.startswith("text_model.") for k in tensors)
    ids = clip_ids(VOCAB - 1, VOCAB - 1)
    expected = np.asarray(load_clip(str(tmp_path))(ids).pooler_output)
    save_file({"text_model." + k: v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    np.testing.assert_array_equal(np.asarray(load_clip(str(tmp_path))(ids).pooler_output), expected)
    assert set(clip_state_dict(load_clip(str(tmp_path)))) == set(tensors)  # export: what transformers 5 writes


def test_t5_round_trip_and_tied_embedding_names(tmp_path):
    ref = tiny_t5()
    ref.save_pretrained(tmp_path / "in")
    path = str(tmp_path / "in" / "model.safetensors")
    tensors = load_file(path)
    assert "shared.weight" in tensors and "encoder.embed_tokens.weight" not in tensors  # what transformers writes
    ours = load_t5(str(tmp_path / "in"))
    state = t5_state_dict(ours)
    assert set(state) == set(tensors)
    for k, v in tensors.items():
        assert np.array_equal(state[k], v), k
    save_t5(ours, str(tmp_path / "out"), max_shard_bytes=4096)
    back = T5EncoderModel.from_pretrained(tmp_path / "out")
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k

    embedding = tensors["shared.weight"]
    # the other name only, and both names (equal): both load to the same model
    for variant in (
        {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in tensors.items()},
        {**tensors, "encoder.embed_tokens.weight": embedding},
    ):
        save_file(variant, path, metadata={"format": "pt"})
        np.testing.assert_array_equal(t5_state_dict(load_t5(str(tmp_path / "in")))["shared.weight"], embedding)
    # both names, different values
    save_file({**tensors, "encoder.embed_tokens.weight": embedding + 1}, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="'shared.weight' .* 'encoder.embed_tokens.weight' .* differ"):
        load_t5(str(tmp_path / "in"))


def _rewrite(folder, fn):
    path = os.path.join(folder, "model.safetensors")
    save_file(fn(load_file(path)), path, metadata={"format": "pt"})
    return path


def test_strict_errors_name_key_and_file(tmp_path):
    tiny_clip(True, 2, "gelu").save_pretrained(tmp_path / "clip")
    folder = str(tmp_path / "clip")
    key = "text_model.encoder.layers.1.self_attn.q_proj.weight"
    path = _rewrite(folder, lambda s: {("x." + k if k == key else k): v for k, v in s.items()})
    with pytest.raises(ConversionError) as e:
        load_clip(folder)
    assert f"unknown key 'x.{key}' in {path}" in str(e.value)
    assert f"missing key '{key}'" in str(e.value)
    _rewrite(
        folder,
        lambda s: {
            k.removeprefix("x."): (np.zeros((3, 32), np.float32) if k == "x." + key else v) for k, v in s.items()
        },
    )
    with pytest.raises(ConversionError, match=rf"shape mismatch for '{key}' in {path}: file has \(3, 32\)"):
        load_clip(folder)

    tiny_t5().save_pretrained(tmp_path / "t5")
    folder = str(tmp_path / "t5")
    key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    path = _rewrite(folder, lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(ConversionError, match=f"missing key '{key}'"):
        load_t5(folder)
    _rewrite(folder, lambda s: {**s, "decoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((48, 32), np.float32)})
    with pytest.raises(
        ConversionError, match=f"unknown key 'decoder.block.0.layer.0.SelfAttention.q.weight' in {path}"
    ):
        load_t5(folder)


def test_bad_configs_are_named(tmp_path):
    tiny_clip(True, 2, "gelu").save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "hidden_act": "mish"}))
    with pytest.raises(ConversionError, match=r"config.json: hidden_act='mish' is not supported"):
        load_clip(str(tmp_path))
    cfg_path.write_text(json.dumps({**cfg, "architectures": ["CLIPModel"]}))
    with pytest.raises(ConversionError, match=r"config.json: architectures=\['CLIPModel'\]"):
        load_clip(str(tmp_path))
    with pytest.raises(ConversionError, match="architectures.*T5ForConditionalGeneration.*encoder weights only"):
        t5_conv.normalize_config({"architectures": ["T5ForConditionalGeneration"]}, "x/config.json")
    with pytest.raises(ConversionError, match="feed_forward_proj='gated-gelu-x'"):
        t5_conv.normalize_config({"feed_forward_proj": "gated-gelu-x"})
    os.remove(cfg_path)
    with pytest.raises(ConversionError, match="config.json: cannot read the CLIP text encoder config"):
        load_clip(str(tmp_path))


SD3_CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
SD3_CLIP_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)
SD3_T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")


def test_tables_match_transformers_and_our_modules_for_sd3_shapes():
    """Key tables = transformers' state dicts = our module trees, for SD3's CLIP-L, CLIP-G and T5-XXL."""
    sizes = {}
    for name, over in [("clip_l", SD3_CLIP_L), ("clip_g", SD3_CLIP_G)]:
        raw = {**over, "eos_token_id": 2, "architectures": ["CLIPTextModelWithProjection"]}
        with torch.device("meta"):
            ref = CLIPTextModelWithProjection(CLIPTextConfig(**over, eos_token_id=2))
        table = clip_conv.param_table(raw)
        assert {e.torch_key: e.torch_shape for e in table} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        model = nnx.eval_shape(lambda raw=raw: CLIPText(OurCLIPConfig.from_transformers(raw), rngs=nnx.Rngs(0)))
        flat = {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model))}
        assert flat == {e.flax_path: e.flax_shape for e in table}, name
        sizes[name] = sum(int(np.prod(s)) for s in flat.values())
    with torch.device("meta"):
        ref = T5EncoderModel(T5Config(**SD3_T5_XXL))
    table = t5_conv.param_table(SD3_T5_XXL)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert {e.torch_key: e.torch_shape for e in table} == want
    model = nnx.eval_shape(lambda: T5Encoder(OurT5Config.from_transformers(SD3_T5_XXL), rngs=nnx.Rngs(0)))
    flat = {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model))}
    assert flat == {e.flax_path: e.flax_shape for e in table}
    sizes["t5_xxl"] = sum(int(np.prod(s)) for s in flat.values())
    assert sizes == {"clip_l": 123_650_304, "clip_g": 694_659_840, "t5_xxl": 4_762_310_656}
    print({k: f"{v / 1e9:.3f} B params, {2 * v / 2**30:.2f} GiB in bf16" for k, v in sizes.items()})


def test_models_run_under_jit_in_bf16_from_config():
    """Built from config (no checkpoint): bf16 end to end, as the pipeline runs them."""
    clip = CLIPText(OurCLIPConfig(**CLIP_TINY, eos_token_id=2), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    t5 = T5Encoder(OurT5Config(**T5_TINY, feed_forward_proj="gated-gelu"), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    ids = jnp.asarray(clip_ids(VOCAB - 1, VOCAB - 1))
    out = jax.jit(lambda g, s, x: nnx.merge(g, s)(x))(*nnx.split(clip), ids)
    assert out.text_embeds.dtype == jnp.bfloat16 and out.text_embeds.shape == (4, CLIP_TINY["projection_dim"])
    h = jax.jit(lambda g, s, x: nnx.merge(g, s)(x).last_hidden_state)(*nnx.split(t5), ids)
    assert h.dtype == jnp.bfloat16 and h.shape == (4, 16, T5_TINY["d_model"])
