"""LoRA to diffusers and back: training checkpoint -> PEFT file (+ fused transformer) -> diffusers, and into
`SD3Pipeline.load_lora`, on a tiny random SD3 pipeline.

A train state from `make_train_state` (discriminator included, to check it is never exported) gets random
non-zero adapters and is saved in the trainer's orbax layout (`state` + `meta` items). `alpha / rank = 2`: folding
a power of two into lora_B is exact in float32, so the round trips are checked bit for bit.

Reusable for end-to-end tests: `lora_model_from_workdir(workdir)` rebuilds the student as training built it
(`apply_lora` with the run's config), and `check_export(workdir, out, model)` exports and compares diffusers'
forward (LoRA adapter and fused transformer) with it, returning the measured errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from conversion.lora import PEFT_FILE, from_state_dict, fuse, to_peft
from conversion.safetensors_io import ConversionError
from conversion.sd3_transformer import param_table
from conversion.training_checkpoint import CheckpointError, read_lora
from flowsteer_jax.distill.config import default_config
from flowsteer_jax.distill.state import make_train_state
from flowsteer_jax.export import export, rectified_sigmas
from flowsteer_jax.models.loading import load_transformer
from flowsteer_jax.models.loading import read_lora as read_lora_pairs
from flowsteer_jax.models.lora import LoRALinear, apply_lora, lora_layers
from flowsteer_jax.outputs import MANIFEST
from flowsteer_jax.pipeline import SD3Pipeline
from flowsteer_jax.tools.tiny_pipeline import write_tiny_pipeline
from tests.torch_reference import rel_err, to_np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK, ALPHA, STEP = 4, 8.0, 5
PROMPTS = ["a photo of a red cat", "the blue cube on a sphere"]
MAX_SEQ = 16


# --- reusable helpers ---


def flat_lora_of(model: nnx.Module) -> dict[str, np.ndarray]:
    """`{"<module path>.lora_a": A, ...}` of every `LoRALinear` in `model` (host float arrays)."""
    out = {}
    for path, layer in nnx.iter_modules(model):
        if isinstance(layer, LoRALinear):
            name = ".".join(map(str, path))
            out[f"{name}.lora_a"] = np.asarray(layer.lora_a[...])
            out[f"{name}.lora_b"] = np.asarray(layer.lora_b[...])
    return out


def lora_model_from_workdir(workdir: str, step: int | None = None, model_folder: str | None = None):
    """The student as training built it: base transformer + `apply_lora(run's rank/alpha/targets)` + saved values."""
    flat, meta = read_lora(workdir, step)
    folder = model_folder or meta["model_path"]
    folder = os.path.join(folder, "transformer") if os.path.isdir(os.path.join(folder, "transformer")) else folder
    model = load_transformer(folder, jnp.float32)
    lo = meta["config"]["lora"]
    apply_lora(model, rank=lo["rank"], alpha=lo["alpha"], targets=tuple(lo["targets"]), rngs=nnx.Rngs(0))
    for path, layer in nnx.iter_modules(model):
        if isinstance(layer, LoRALinear):
            name = ".".join(map(str, path))
            layer.lora_a.set_value(jnp.asarray(flat.pop(f"{name}.lora_a")))
            layer.lora_b.set_value(jnp.asarray(flat.pop(f"{name}.lora_b")))
    assert not flat, f"checkpoint adapters the run's targets do not produce: {sorted(flat)}"
    return model, meta


def transformer_inputs(config: dict, batch: int = 2, seq: int = 7, seed: int = 0):
    """NCHW latents, timesteps, text tokens, pooled: random inputs for both libraries."""
    r = np.random.default_rng(seed)
    s, c = config["sample_size"], config["in_channels"]
    x = r.standard_normal((batch, c, s, s)).astype(np.float32)
    t = np.array([900.0, 250.0][:batch] + [500.0] * max(batch - 2, 0), np.float32)
    ctx = r.standard_normal((batch, seq, config["joint_attention_dim"])).astype(np.float32)
    pooled = r.standard_normal((batch, config["pooled_projection_dim"])).astype(np.float32)
    return x, t, ctx, pooled


@jax.jit
def _jit_forward(graphdef, state, x, t, ctx, pooled):
    return nnx.merge(graphdef, state)(x, t, ctx, pooled)


def ours_forward(model, inputs) -> np.ndarray:
    """Our MMDiT on NCHW inputs (jitted: a LoRA-applied model has the same graph each time)."""
    x, t, ctx, pooled = inputs
    graphdef, state = nnx.split(model)
    out = _jit_forward(graphdef, state, jnp.asarray(x.transpose(0, 2, 3, 1)), t, ctx, pooled)
    return np.asarray(out).transpose(0, 3, 1, 2)


def torch_forward(model, inputs) -> np.ndarray:
    x, t, ctx, pooled = (torch.from_numpy(a) for a in inputs)
    with torch.no_grad():
        return to_np(model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample)


@contextlib.contextmanager
def captured_warnings():
    """Everything diffusers/peft/transformers log at WARNING+ and every `warnings.warn`, as a list of strings."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield messages
        finally:
            for lg in loggers:
                lg.removeHandler(handler)
    messages += [str(w.message) for w in caught]


def key_problems(messages: list[str]) -> list[str]:
    """Warnings about unexpected/missing/mismatched keys. The pipeline's note that the *text encoders* got no LoRA
    keys (a transformer-only LoRA, by design) is not one."""
    words = ("unexpected", "missing", "not found", "mismatch", "incompatible")
    benign = "No LoRA keys associated to CLIPTextModel"
    return [m for m in messages if any(w in m.lower() for w in words) and not m.startswith(benign)]


def check_export(workdir: str, out: str, model=None, *, fuse: bool = True, step: int | None = None) -> dict:
    """Export `workdir` to `out` and compare diffusers' forward (LoRA adapter, and fused) with `model`.

    `model`: our LoRA-applied MMDiT (default `lora_model_from_workdir`). Asserts the file's keys and shapes are
    PEFT's, that diffusers loads it without key warnings, and returns `{"adapter": rel_err, "fused": rel_err}`.
    """
    if model is None:
        model, meta = lora_model_from_workdir(workdir, step)
    else:
        meta = read_lora(workdir, step)[1]
    export(workdir, out, step=step, do_fuse=fuse)
    tconf = meta["transformer_config"]
    table = {e.torch_key: e for e in param_table(tconf)}
    with safe_open(os.path.join(out, PEFT_FILE), framework="np") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    adapted = {".".join(map(str, p)): m.kernel.shape for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)}
    want = {}
    for path, (d_in, d_out) in adapted.items():
        torch_name = next(e.torch_key for e in table.values() if e.flax_path[:-1] == tuple(_keys(path)))[:-7]
        want[f"transformer.{torch_name}.lora_A.weight"] = (meta["config"]["lora"]["rank"], d_in)
        want[f"transformer.{torch_name}.lora_B.weight"] = (d_out, meta["config"]["lora"]["rank"])
    assert shapes == want

    inputs = transformer_inputs(tconf)
    ref = ours_forward(model, inputs)
    base = meta["model_path"]
    base = os.path.join(base, "transformer") if os.path.isdir(os.path.join(base, "transformer")) else base
    errors = {}
    tm = SD3Transformer2DModel.from_pretrained(base).eval()
    with captured_warnings() as messages:
        tm.load_lora_adapter(out, prefix="transformer", weight_name=PEFT_FILE)
    assert not key_problems(messages), messages
    errors["adapter"] = rel_err(torch_forward(tm, inputs), ref)
    if fuse:
        fused = SD3Transformer2DModel.from_pretrained(os.path.join(out, "transformer")).eval()
        errors["fused"] = rel_err(torch_forward(fused, inputs), ref)
    return errors


def _keys(dotted: str) -> list:
    return [int(k) if k.isdigit() else k for k in dotted.split(".")]


def save_workdir(
    workdir: str, pipeline_folder: str, *, rank: int = RANK, alpha: float = ALPHA, step: int = STEP, ema: bool = False
):
    """A train state with random non-zero adapters, saved in the trainer's orbax layout; returns its flat LoRA.
    With `ema`, the run kept an EMA of them (`ema.decay > 0`) whose every weight is half the adapters'."""
    transformer = os.path.join(pipeline_folder, "transformer")
    with open(os.path.join(transformer, "config.json")) as f:
        tconf = json.load(f)
    c = default_config()
    c.lora.rank, c.lora.alpha = rank, alpha
    c.model.latent_shape = (tconf["sample_size"], tconf["sample_size"], tconf["in_channels"])
    if "path" in c.model:
        c.model.path = pipeline_folder
    c.disc.num_blocks = 1  # keep the discriminator: it must not be exported
    c.ema.decay = 0.9 if ema else 0.0
    state, _, _ = make_train_state(c, load_transformer(transformer, jnp.float32))
    assert "disc" in state["params"]
    leaves, treedef = jax.tree.flatten(state["params"]["lora"])
    r = np.random.default_rng(1)
    new = []
    for leaf in leaves:  # lora_a (in, r) then lora_b (r, out) in some order: O(1) effect either way
        fan = leaf.shape[0]
        new.append(jnp.asarray(r.standard_normal(leaf.shape).astype(np.float32) * 0.5 / np.sqrt(fan)))
    state["params"]["lora"] = jax.tree.unflatten(treedef, new)
    if ema:
        state["ema"] = jax.tree.unflatten(treedef, [0.5 * x for x in new])
    meta = {
        "step": step,
        "config": json.loads(json.dumps(c.to_dict())),
        "transformer_config": tconf,
        "model_path": pipeline_folder,
    }
    mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    mgr.wait_until_finished()
    mgr.close()
    flat = {}
    for path, var in nnx.to_flat_state(state["params"]["lora"]):
        flat[".".join(map(str, path))] = np.asarray(var.get_value() if hasattr(var, "get_value") else var)
    return flat


# --- fixtures ---


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_export")
    folder = str(root / "sd3")
    write_tiny_pipeline(folder, with_t5=False)
    workdir = str(root / "run")
    flat = save_workdir(workdir, folder)
    out = str(root / "export")
    return dict(root=root, folder=folder, workdir=workdir, flat=flat, out=out)


@pytest.fixture(scope="module")
def student(world):
    return lora_model_from_workdir(world["workdir"])


@pytest.fixture(scope="module")
def ours(world):
    return SD3Pipeline.from_pretrained(world["folder"], dtype=jnp.float32)


@pytest.fixture(scope="module")
def exported(world, student):
    model, _ = student
    errors = check_export(world["workdir"], world["out"], model, fuse=True)
    return errors


# --- tests ---


def test_read_lora_restores_only_adapters(world):
    flat, meta = read_lora(world["workdir"])
    assert meta["step"] == STEP and meta["config"]["lora"]["rank"] == RANK
    assert flat.keys() == world["flat"].keys()
    assert all(k.endswith((".lora_a", ".lora_b")) and k.startswith("transformer_blocks.") for k in flat)
    for k, v in flat.items():
        np.testing.assert_array_equal(v, world["flat"][k])
        assert isinstance(v, np.ndarray) and v.dtype == np.float32


def test_export_matches_diffusers_forward(world, exported):
    # keys/shapes, no key warnings: checked inside check_export
    print(f"diffusers forward vs ours: {exported}")
    assert exported["adapter"] <= 1e-4, exported
    assert exported["fused"] <= 1e-4, exported
    with safe_open(os.path.join(world["out"], PEFT_FILE), framework="np") as f:
        keys = list(f.keys())
    assert not any("disc" in k or "alpha" in k for k in keys)
    readme = open(os.path.join(world["out"], "README.md")).read()
    assert "sigmas = [1.0, 0.9, 0.75, 0.5]" in readme and "guidance_scale=0.0" in readme
    assert rectified_sigmas(4, 3.0) == [1.0, 0.9, 0.75, 0.5]
    assert rectified_sigmas(2, 5.0) == [1.0, float(str(np.float32(5 / 6)))]
    assert os.path.isfile(os.path.join(world["out"], "transformer", "config.json"))


def test_fused_sharded_and_dtype(world, student, tmp_path):
    model, meta = student
    out = str(tmp_path / "fused")
    export(world["workdir"], out, do_fuse=True, dtype="bf16", max_shard_bytes=20_000)
    tdir = os.path.join(out, "transformer")
    assert os.path.isfile(os.path.join(tdir, "diffusion_pytorch_model.safetensors.index.json"))
    fused = SD3Transformer2DModel.from_pretrained(tdir, torch_dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in fused.parameters())
    inputs = transformer_inputs(meta["transformer_config"])
    err = rel_err(torch_forward(fused.float(), inputs), ours_forward(model, inputs))
    assert err < 0.05, err  # bf16 weights


def test_diffusers_pipeline_sampling_matches_load_lora(world, exported, ours):
    ref = StableDiffusion3Pipeline.from_pretrained(world["folder"], text_encoder_3=None, tokenizer_3=None)
    ref.set_progress_bar_config(disable=True)
    with captured_warnings() as messages:
        ref.load_lora_weights(world["out"])
    assert not key_problems(messages), messages
    # diffusers reads rank and alpha from the file's lora_adapter_metadata (alpha = rank: the scale is in lora_B)
    _, read = StableDiffusion3Pipeline.lora_state_dict(world["out"], return_lora_metadata=True)
    assert (read["transformer.r"], read["transformer.lora_alpha"]) == (RANK, RANK)
    assert len(read["transformer.target_modules"]) == len(world["flat"]) // 2
    (peft_config,) = ref.transformer.peft_config.values()
    assert (peft_config.r, peft_config.lora_alpha) == (RANK, RANK)
    readme_sigmas = rectified_sigmas(4, 3.0)
    ref.scheduler = FlowMatchEulerDiscreteScheduler.from_config(ref.scheduler.config, shift=1.0)
    noise = np.random.default_rng(0).standard_normal((2, 16, 16, 16)).astype(np.float32)
    want = ref(
        prompt=PROMPTS,
        num_inference_steps=4,
        guidance_scale=0.0,
        sigmas=readme_sigmas,
        latents=torch.from_numpy(noise),
        max_sequence_length=MAX_SEQ,
        output_type="latent",
    ).images
    np.testing.assert_array_equal(to_np(ref.scheduler.sigmas), np.asarray([*readme_sigmas, 0.0], np.float32))
    np.testing.assert_array_equal(to_np(ref.scheduler.sigmas), ours.sigmas(4, "rectified"))

    kw = dict(
        num_inference_steps=4, guidance_scale=0.0, schedule="rectified", latents=noise, max_sequence_length=MAX_SEQ
    )
    plain = np.asarray(ours(PROMPTS, output_type="latent", **kw))
    results = {}
    for source in (world["workdir"], world["out"], os.path.join(world["out"], PEFT_FILE)):
        adapted = ours.load_lora(source)
        assert len(adapted) == len(world["flat"]) // 2 == len(lora_layers(ours.transformer))
        results[source] = np.asarray(ours(PROMPTS, output_type="latent", **kw))
        err = rel_err(results[source], to_np(want))
        print(f"4-step rectified sampling vs diffusers, LoRA from {os.path.basename(source)}: rel err {err:.2e}")
        assert err <= 1e-4, (source, err)
    assert rel_err(plain, to_np(want)) > 1e-2  # the LoRA matters
    # workdir (scale alpha/rank on the layer) vs exported file (scale folded into B): 2x is exact in float32
    np.testing.assert_array_equal(results[world["workdir"]], results[world["out"]])
    # scale 0 is the base model; loading again replaced the adapters instead of stacking them
    ours.load_lora(world["out"], scale=0.0)
    np.testing.assert_array_equal(np.asarray(ours(PROMPTS, output_type="latent", **kw)), plain)


def test_round_trips_bit_exact(world, student, ours):
    model, meta = student
    tconf = meta["transformer_config"]
    flat = world["flat"]
    back, rank, _ = from_state_dict(to_peft(flat, 1.0, tconf), tconf)
    assert rank == RANK and back.keys() == flat.keys()
    for k in flat:
        np.testing.assert_array_equal(back[k], flat[k])
    # the exported file: scale 2 folded into B, exact
    with safe_open(os.path.join(world["out"], PEFT_FILE), framework="np") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    back, _, _ = from_state_dict(sd, tconf)
    for k in flat:
        np.testing.assert_array_equal(back[k], flat[k] * (2.0 if k.endswith("lora_b") else 1.0))

    # load_lora into a fresh pipeline reproduces the training-built student's forward bit for bit
    pipe = ours
    pipe.load_lora(world["out"])
    inputs = transformer_inputs(tconf)
    np.testing.assert_array_equal(ours_forward(pipe.transformer, inputs), ours_forward(model, inputs))
    pipe.load_lora(world["workdir"])
    loaded = flat_lora_of(pipe.transformer)
    assert loaded.keys() == flat.keys() and all(np.array_equal(loaded[k], flat[k]) for k in flat)
    np.testing.assert_array_equal(ours_forward(pipe.transformer, inputs), ours_forward(model, inputs))

    # down/up naming, no prefix, with alpha keys (alpha / r = 0.5 folded back: exact)
    old = {}
    for k, v in sd.items():
        name = k.removeprefix("transformer.")
        if name.endswith(".lora_A.weight"):
            module = name[: -len(".lora_A.weight")]
            old[f"{module}.lora.down.weight"] = v
            old[f"{module}.alpha"] = np.asarray(v.shape[0] * 0.5, np.float32)
        else:
            old[name.replace(".lora_B.weight", ".lora.up.weight")] = v * np.float32(2.0)
    path = str(world["root"] / "old_naming.safetensors")
    save_file(old, path)
    pipe.load_lora(path)
    np.testing.assert_array_equal(ours_forward(pipe.transformer, inputs), ours_forward(model, inputs))

    # fuse on Flax flat params equals fuse on the torch state dict (transposed)
    tsd = {
        e.torch_key: np.random.default_rng(0).standard_normal(e.torch_shape).astype(np.float32)
        for e in param_table(tconf)
        if e.kind == "linear"
    }
    fsd = {e.flax_path: tsd[e.torch_key].T for e in param_table(tconf) if e.kind == "linear"}
    ft, ff = fuse(tsd, flat, 2.0, tconf), fuse(fsd, flat, 2.0, tconf)
    for e in param_table(tconf):
        if e.kind == "linear":
            np.testing.assert_array_equal(ft[e.torch_key].T, ff[e.flax_path])


def test_strict_errors(world, tmp_path):
    tconf = read_lora(world["workdir"])[1]["transformer_config"]
    with safe_open(os.path.join(world["out"], PEFT_FILE), framework="np") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    bad = dict(sd)
    bad["transformer.transformer_blocks.0.attn.to_qq.lora_A.weight"] = next(iter(sd.values()))
    with pytest.raises(ConversionError, match=r"to_qq.*maps to no Linear"):
        from_state_dict(bad, tconf)
    bad = {k: v for k, v in sd.items() if not k.endswith("to_k.lora_B.weight")}
    with pytest.raises(ConversionError, match=r"transformer_blocks.0.attn.to_k.*needs both"):
        from_state_dict(bad, tconf)
    bad = {**sd, "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": np.zeros(3, np.float32)}
    with pytest.raises(ConversionError, match="lora_magnitude_vector.*not a LoRA key"):
        from_state_dict(bad, tconf)
    path = str(tmp_path / "bad.safetensors")
    save_file({**sd, "transformer.pos_embed.proj.lora_A.weight": np.zeros((4, 2), np.float32)}, path)
    pipe = SD3Pipeline.__new__(SD3Pipeline)  # load_lora needs only the transformer
    pipe.transformer, pipe.mesh = load_transformer(os.path.join(world["folder"], "transformer")), None
    with pytest.raises(ConversionError, match=r"(?s)bad.safetensors.*pos_embed.proj"):
        pipe.load_lora(path)
    assert not lora_layers(pipe.transformer)  # a bad file changes nothing
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pipe.load_lora(str(tmp_path / "nowhere"))

    # checkpoints: none, unknown step, incomplete step
    with pytest.raises(CheckpointError, match=r"no checkpoints/ folder"):
        read_lora(str(tmp_path))
    os.makedirs(tmp_path / "empty" / "checkpoints")
    with pytest.raises(CheckpointError, match=r"empty/checkpoints: no checkpoints"):
        read_lora(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match=rf"step 99 not found; available steps: \[{STEP}\]"):
        read_lora(world["workdir"], 99)
    partial = tmp_path / "partial"
    shutil.copytree(world["workdir"], partial)
    shutil.rmtree(partial / "checkpoints" / str(STEP) / "meta")
    with pytest.raises(CheckpointError, match=rf"partial/checkpoints/{STEP}: incomplete checkpoint.*'meta'"):
        read_lora(str(partial))


EXPORT_MODULES = {"flowsteer_jax", "flowsteer_jax.cli", "flowsteer_jax.export", "flowsteer_jax.flow"}
EXPORT_MODULES |= {"flowsteer_jax.flow.schedules", "flowsteer_jax.outputs"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The exporter as users run it (by its old path, the alias of `python -m flowsteer_jax.export`), checking it
    imports neither torch nor any of flowsteer_jax but the export, its flag helper and the numpy schedules."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['conversion/export_to_diffusers.py', *{list(args)!r}]\n"
        "try:\n    runpy.run_path('conversion/export_to_diffusers.py', run_name='__main__')\n"
        "except SystemExit as e:\n    rc = e.code\n"
        f"ok = {sorted(EXPORT_MODULES)!r}\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('flowsteer_jax') and m not in ok]\n"
        "assert not bad, bad\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)


def test_cli(world, exported, tmp_path):
    out = str(tmp_path / "cli")
    # Relative paths, as users type them (orbax itself wants absolute ones).
    rel = os.path.relpath(world["workdir"], ROOT)
    proc = _cli(f"--checkpoint={rel}", f"--out={os.path.relpath(out, ROOT)}", f"--step={STEP}")
    assert proc.returncode == 0, proc.stderr
    with (
        safe_open(os.path.join(out, PEFT_FILE), framework="np") as f,
        safe_open(os.path.join(world["out"], PEFT_FILE), framework="np") as g,
    ):
        assert set(f.keys()) == set(g.keys())
        assert all(np.array_equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
    assert not os.path.exists(os.path.join(out, "transformer"))

    missing = str(tmp_path / "no_run")
    proc = _cli(f"--checkpoint={missing}", f"--out={out}")
    assert proc.returncode == 2 and "no_run: no such directory" in proc.stderr, proc.stderr

    other = tmp_path / "other"  # a base with another transformer config
    os.makedirs(other / "transformer")
    with open(os.path.join(world["folder"], "transformer", "config.json")) as f:
        raw = json.load(f)
    with open(other / "transformer" / "config.json", "w") as f:
        json.dump({**raw, "num_layers": 3}, f)
    proc = _cli(f"--checkpoint={world['workdir']}", f"--out={out}", f"--model={other}", "--fuse")
    assert proc.returncode == 2, proc.stderr
    assert f"{other}/transformer/config.json" in proc.stderr and "num_layers: base 3 vs checkpoint 2" in proc.stderr


def test_sample_cli_lora(world, exported, ours, tmp_path, monkeypatch):
    from flowsteer_jax import sample

    monkeypatch.setattr(SD3Pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: ours))
    ours.load_lora(world["workdir"])

    base = [f"--model={world['folder']}", "--prompts=a red cat", "--steps=2", "--batch=1", f"--out={tmp_path}"]
    base.append(f"--max_sequence_length={MAX_SEQ}")
    assert sample.main([*base, f"--lora={tmp_path / 'nope'}"]) == 2
    assert sample.main([*base, f"--lora={world['out']}", "--lora_scale=0.5"]) == 0
    assert os.path.isfile(tmp_path / "00000.png")
    layers = lora_layers(ours.transformer)  # --lora replaced the adapters, with --lora_scale on the layer
    assert len(layers) == len(world["flat"]) // 2 and all(layer.lora_scale == 0.5 for layer in layers)


def test_sample_never_overwrites_images(world, exported, ours, tmp_path, monkeypatch, capsys):
    """Issue #24: `sample --out` overwrote earlier images. Now a second run needs --overwrite and replaces the
    folder whole (no stale image of a longer earlier run); a failed run leaves its log, named in its one line."""
    from flowsteer_jax import sample

    monkeypatch.setattr(SD3Pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: ours))
    out = tmp_path / "samples"
    base = [f"--model={world['folder']}", "--steps=2", "--batch=1", f"--out={out}", f"--max_sequence_length={MAX_SEQ}"]
    (tmp_path / "two.txt").write_text("a red cat\nthe blue cube\n")
    assert sample.main([*base, f"--prompts={tmp_path / 'two.txt'}"]) == 0
    first = tree_hashes(out)
    capsys.readouterr()
    assert sample.main([*base, "--prompt=a dog"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"flowsteer_jax.sample: error: --out={out} holds an earlier output of flowsteer_jax.sample; pass "
        "--overwrite to replace it (all of it)"
    ]
    assert tree_hashes(out) == first
    assert sample.main([*base, "--prompt=a dog", "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["00000.png", MANIFEST, "grid.png", "prompts.txt", "sample.log"]
    assert (out / "prompts.txt").read_text() == "a dog\n"
    # a bad --lora is refused before anything is written (checked against the model's config first)
    os.makedirs(tmp_path / "not_a_lora")
    failed = tmp_path / "failed"
    capsys.readouterr()
    assert sample.main([*base[:-2], f"--out={failed}", "--prompt=a dog", f"--lora={tmp_path / 'not_a_lora'}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("flowsteer_jax.sample: error: --lora=") and not os.path.exists(failed), err
    # a failure after the output was started: one line naming the log; the folder keeps only the log
    from conversion.errors import InputError
    from flowsteer_jax import pipeline as pipeline_module

    def broken(*args, **kwargs):
        raise InputError("the model could not be loaded")

    monkeypatch.setattr(pipeline_module.SD3Pipeline, "from_pretrained", broken)
    assert sample.main([*base[:-2], f"--out={failed}", "--prompt=a dog"]) == 2
    err = capsys.readouterr().err.splitlines()
    log = os.path.join(os.path.realpath(failed), "sample.log")
    assert [line for line in err if "error" in line] == err[-1:], err  # before it: progress lines only
    assert err[-1] == f"flowsteer_jax.sample: error: the model could not be loaded (log: {log})", err
    assert sorted(os.listdir(failed)) == [MANIFEST, "sample.log"]
    assert "failed: the model could not be loaded" in open(log).read()
    ours.load_lora(world["workdir"])  # as test_sample_cli_lora left it


def test_weights_fingerprint_tells_weights_apart(tmp_path):
    """One value changed (same keys, shapes, size): another fingerprint; the same values saved again: the same."""
    from conversion.safetensors_io import save_checkpoint, weights_fingerprint

    r = np.random.default_rng(0)
    tensors = {f"w{i}": r.standard_normal((64, 64)).astype(np.float32) for i in range(4)}
    save_checkpoint(tensors, str(tmp_path / "a"))
    save_checkpoint(tensors, str(tmp_path / "b"))
    tensors["w0"][0, 0] += 1.0
    save_checkpoint(tensors, str(tmp_path / "c"))
    a, b, c = (weights_fingerprint(str(tmp_path / n)) for n in "abc")
    assert a == b != c and len(a) == 16


def test_folder_fingerprint_is_content_not_path(tmp_path):
    """Any model folder (a tokenizer's files, configs, weights): a copy elsewhere has the same print, an edited
    vocabulary or config another; the transformer's `weights_fingerprint` is unchanged by the shared reader."""
    import shutil

    from conversion.safetensors_io import folder_fingerprint, save_checkpoint, weights_fingerprint

    folder = tmp_path / "text_encoder"
    save_checkpoint({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(folder), name="model")
    (folder / "config.json").write_text('{"hidden_size": 3}')
    (folder / "sub").mkdir()
    (folder / "sub" / "vocab.txt").write_text("a\nb\n")
    moved = shutil.copytree(folder, tmp_path / "elsewhere" / "text_encoder")
    first = folder_fingerprint(str(folder))
    assert folder_fingerprint(str(moved)) == first and len(first) == 16
    (moved / "sub" / "vocab.txt").write_text("a\nc\n")
    assert folder_fingerprint(str(moved)) != first
    (folder / "config.json").write_text('{"hidden_size": 4}')
    assert folder_fingerprint(str(folder)) not in (first, folder_fingerprint(str(moved)))
    assert weights_fingerprint(str(folder)) == "08d65cb2825df16b"  # the value before folder_fingerprint existed


# --- never overwrite, the base's fingerprint, unreadable checkpoints, the ComfyUI file (issue #15) ---


def tree_hashes(folder) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder`."""
    import hashlib

    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_export(capsys, *args: str) -> tuple[int, list[str]]:
    """`flowsteer_jax.export.main(args)` in process: (exit code, stderr lines)."""
    from flowsteer_jax import export as export_mod

    capsys.readouterr()
    rc = export_mod.main(list(args))
    return rc, capsys.readouterr().err.splitlines()


def with_meta(src: str, dst: str, **extra) -> str:
    """A copy of workdir `src` whose newest step's meta has `extra` keys (as a newer trainer writes them)."""
    from conversion.training_checkpoint import resolve_step

    shutil.copytree(src, dst)
    directory, step = resolve_step(dst)
    path = os.path.join(directory, str(step), "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    with open(path, "w") as f:
        json.dump({**meta, **extra}, f)
    return dst


def test_export_never_writes_into_the_base(world, exported, capsys):
    folder = world["folder"]
    before = tree_hashes(folder)
    ck = f"--checkpoint={world['workdir']}"
    for out in (folder, os.path.join(folder, "transformer"), os.path.dirname(folder)):
        for extra in ([], ["--overwrite"]):
            rc, err = run_export(capsys, ck, f"--out={out}", "--fuse", *extra)
            assert rc == 2 and len(err) == 1, err
            assert err[0].startswith("flowsteer_jax.export: error: --out=") and "even with --overwrite" in err[0]
            assert out in err[0] and folder in err[0], err
    assert tree_hashes(folder) == before
    assert not [n for n in os.listdir(world["root"]) if ".tmp-" in n or ".old-" in n]
    # the training workdir is never replaced either
    rc, err = run_export(capsys, ck, f"--out={world['workdir']}", "--overwrite")
    assert rc == 2 and len(err) == 1 and "is a training workdir" in err[0], err


def test_export_refuses_a_non_empty_out(world, exported, tmp_path, capsys):
    out = tmp_path / "taken"
    os.makedirs(out / "sub")
    (out / "README.md").write_text("mine")
    (out / "sub" / "x.safetensors").write_text("not weights")
    before = tree_hashes(out)
    for extra in ([], ["--overwrite"]):  # not an export's output: never replaced
        rc, err = run_export(capsys, f"--checkpoint={world['workdir']}", f"--out={out}", *extra)
        assert rc == 2 and len(err) == 1 and f"--out={out} exists, is not empty" in err[0], err
        assert "not an output of flowsteer_jax.export" in err[0]
    assert tree_hashes(out) == before
    os.makedirs(tmp_path / "empty")  # an empty folder is fine
    rc, err = run_export(capsys, f"--checkpoint={world['workdir']}", f"--out={tmp_path / 'empty'}", "--format=peft")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "empty")) == sorted(
        ["README.md", "export.json", "export.log", MANIFEST, PEFT_FILE, "workflow.json"]
    )


def test_export_never_writes_into_a_run_or_a_checkpoint(world, exported, tmp_path, capsys, monkeypatch):
    """Issue #24's probes: `--out` inside the workdir's checkpoints, the base's VAE, another run (each deleted
    with `--overwrite` before), a new step folder (which blocked the next resume), and `--out=.` inside a run:
    one line, exit 2, nothing touched."""
    from conversion.training_checkpoint import resolve_step

    run, other, base = tmp_path / "run", tmp_path / "other_run", tmp_path / "sd3"
    shutil.copytree(world["workdir"], run)
    shutil.copytree(world["workdir"], other)
    shutil.copytree(world["folder"], base)
    before = {p: tree_hashes(p) for p in (run, other, base)}
    probes = [
        (run / "checkpoints", ["--overwrite"], "is a folder of training checkpoints"),
        (run / "checkpoints" / "9", [], "is inside a folder of training checkpoints"),
        (base / "vae", [f"--model={base}", "--overwrite"], "is a model folder"),
        (other, ["--overwrite"], "is a training workdir"),
        (run / "exports", [], "is inside a training workdir"),
    ]
    for out, extra, why in probes:
        rc, err = run_export(capsys, f"--checkpoint={run}", f"--out={out}", *extra)
        assert rc == 2 and len(err) == 1 and f"--out={out} {why}" in err[0], (out, err)
        assert "even with --overwrite" in err[0]
    monkeypatch.chdir(run / "checkpoints" / str(STEP) / "state")
    rc, err = run_export(capsys, f"--checkpoint={run}", "--out=.")
    assert rc == 2 and len(err) == 1 and "--out=. is inside a training checkpoint" in err[0], err
    assert {p: tree_hashes(p) for p in (run, other, base)} == before
    assert resolve_step(str(run)) == (os.path.join(str(run), "checkpoints"), STEP)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]
    # evaluate's outputs follow the same rule (refused before any scorer loads)
    from flowsteer_jax import evaluate

    rc = evaluate.main([f"--images={base}", f"--out={run / 'eval'}", "--metrics=clip", f"--weights={base}"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and err == [
        f"flowsteer_jax.evaluate: error: --out={run / 'eval'} is inside a training workdir ({run}); never written "
        "to, even with --overwrite (choose another --out)"
    ]


def test_overwrite_replaces_a_sharded_export_whole(world, student, tmp_path, capsys):
    model, meta = student
    out = tmp_path / "fused"
    ck = f"--checkpoint={world['workdir']}"
    rc, err = run_export(capsys, ck, f"--out={out}", "--fuse", "--dtype=bf16", "--max_shard_bytes=20000")
    assert rc == 0, err
    tdir = out / "transformer"
    first = sorted(os.listdir(tdir))
    assert "diffusion_pytorch_model.safetensors.index.json" in first and len(first) > 3, first
    rc, err = run_export(capsys, ck, f"--out={out}", "--fuse", "--format=peft")
    assert rc == 2 and len(err) == 1 and "holds an earlier output of flowsteer_jax.export; pass --overwrite" in err[0]
    (out / "mine.txt").write_text("not from the export")  # a file the user added: never deleted
    rc, err = run_export(capsys, ck, f"--out={out}", "--fuse", "--format=peft", "--overwrite")
    assert rc == 2 and len(err) == 1 and "did not write (mine.txt)" in err[0], err
    os.remove(out / "mine.txt")
    rc, err = run_export(capsys, ck, f"--out={out}", "--fuse", "--format=peft", "--overwrite")
    assert rc == 0, err
    assert sorted(os.listdir(tdir)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(os.listdir(out)) == sorted(
        ["README.md", "export.json", "export.log", MANIFEST, PEFT_FILE, "transformer", "workflow.json"]
    )
    assert (out / "export.log").read_text().count("start:") == 2  # the folder's history, carried over
    assert not [n for n in os.listdir(tmp_path) if n != "fused"]  # no .tmp-/.old- folder left
    fused = SD3Transformer2DModel.from_pretrained(str(tdir)).eval()
    assert all(p.dtype == torch.float32 for p in fused.parameters())  # the new (fp32) weights, not the bf16 shards
    inputs = transformer_inputs(meta["transformer_config"])
    assert rel_err(torch_forward(fused, inputs), ours_forward(model, inputs)) <= 1e-4
    record = json.loads((out / "export.json").read_text())
    assert record["step"] == STEP and record["fused"] and record["format"] == "peft"
    assert record["checkpoint"] == os.path.realpath(world["workdir"])
    assert record["base_model"] == os.path.realpath(world["folder"]) and len(record["base_fingerprint"]) == 16


def test_fuse_checks_the_base_fingerprint(world, exported, tmp_path, capsys):
    from conversion.safetensors_io import save_checkpoint, weights_fingerprint

    tdir = os.path.join(world["folder"], "transformer")
    fp = weights_fingerprint(tdir)
    workdir = with_meta(world["workdir"], str(tmp_path / "run"), base_fingerprint=fp)
    other = tmp_path / "other"  # same config, other values
    shutil.copytree(world["folder"], other, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    ckpt = open_checkpoint_np(tdir)
    save_checkpoint({k: v + np.asarray(0.01, v.dtype) for k, v in ckpt.items()}, str(other / "transformer"))
    rc, err = run_export(capsys, f"--checkpoint={workdir}", f"--out={tmp_path / 'a'}", "--fuse", f"--model={other}")
    assert rc == 2 and len(err) == 1, err
    assert f"{other}/transformer" in err[0] and world["folder"] in err[0], err
    assert "differ from the ones the LoRA was trained on" in err[0]
    assert not os.path.exists(tmp_path / "a")
    rc, err = run_export(capsys, f"--checkpoint={workdir}", f"--out={tmp_path / 'b'}", "--fuse")
    assert rc == 0 and not err, err
    assert json.loads((tmp_path / "b" / "export.json").read_text())["base_fingerprint"] == fp
    # an older checkpoint (no base_fingerprint): one warning line, and the export goes on
    rc, err = run_export(capsys, f"--checkpoint={world['workdir']}", f"--out={tmp_path / 'c'}", "--fuse")
    assert rc == 0 and len(err) == 1 and "warning" in err[0] and "no base_fingerprint" in err[0], err


def open_checkpoint_np(folder: str):
    from conversion.safetensors_io import open_checkpoint

    return open_checkpoint(folder)


def test_unreadable_newest_checkpoint(world, exported, tmp_path, capsys):
    """A newer step that cannot be read: one line naming it, the other steps, exit 2, nothing deleted; --step of
    the good one works."""
    good = str(tmp_path / "good")
    cases = {
        "garbage_meta": lambda d: open(os.path.join(d, "meta", "metadata"), "w").write("garbage"),
        "no_meta": lambda d: shutil.rmtree(os.path.join(d, "meta")),
        "truncated_state": lambda d: [
            os.truncate(os.path.join(p, n), 10)
            for p, _, names in os.walk(os.path.join(d, "state"))
            for n in names
            if os.sep + "d" in p
        ],
    }
    for name, corrupt in cases.items():
        workdir = tmp_path / name
        shutil.copytree(world["workdir"], workdir)
        bad = workdir / "checkpoints" / "7"
        shutil.copytree(workdir / "checkpoints" / str(STEP), bad)
        corrupt(str(bad))
        before = tree_hashes(workdir)
        rc, err = run_export(capsys, f"--checkpoint={workdir}", f"--out={tmp_path / 'x'}")
        assert rc == 2 and len(err) == 1, (name, err)
        assert f"{bad}:" in err[0] and f"other steps on disk: [{STEP}]" in err[0] and "--step=N" in err[0], err
        assert tree_hashes(workdir) == before and not os.path.exists(tmp_path / "x")
        if name != "no_meta":
            with pytest.raises(CheckpointError, match=r"step 7 cannot be read"):
                read_lora(str(workdir))  # SD3Pipeline.load_lora(workdir) reads through this
        out = tmp_path / f"{name}_out"
        rc, err = run_export(capsys, f"--checkpoint={workdir}", f"--out={out}", f"--step={STEP}", "--format=peft")
        assert rc == 0, err
        if not os.path.exists(good):
            shutil.copytree(out, good)
        assert tree_hashes(out)[PEFT_FILE] == tree_hashes(good)[PEFT_FILE]


def test_comfyui_file_matches_the_peft_one(world, exported, student):
    """The ComfyUI/kohya file (`lora_transformer_<module>.lora_down/lora_up.weight`, `.alpha`), resolved the way
    ComfyUI's SD3 key map does (diffusers module names, dots as underscores) and loaded by diffusers with its
    alphas (`network_alphas`: scale alpha / rank), gives the PEFT export's forward."""
    from conversion.lora import COMFYUI_FILE

    _, meta = student
    tconf = meta["transformer_config"]
    with safe_open(os.path.join(world["out"], COMFYUI_FILE), framework="pt") as f:
        comfy = {k: f.get_tensor(k) for k in f.keys()}
    assert comfy and all(k.startswith("lora_transformer_") for k in comfy)
    alphas = {k: float(v) for k, v in comfy.items() if k.endswith(".alpha")}
    assert len(alphas) * 3 == len(comfy) and set(alphas.values()) == {ALPHA}
    base = os.path.join(world["folder"], "transformer")
    tm = SD3Transformer2DModel.from_pretrained(base).eval()
    names = {n.replace(".", "_"): n for n, m in tm.named_modules() if isinstance(m, torch.nn.Linear)}
    sd, network_alphas = {}, {}
    for key, value in comfy.items():
        stem, _, suffix = key.partition(".")
        module = "transformer." + names[stem.removeprefix("lora_transformer_")]
        if suffix == "alpha":
            network_alphas[f"{module}.alpha"] = float(value)
        else:
            assert value.shape[0 if suffix == "lora_down.weight" else 1] == RANK
            sd[f"{module}.{'lora_A' if suffix == 'lora_down.weight' else 'lora_B'}.weight"] = value
    with captured_warnings() as messages:
        tm.load_lora_adapter(sd, prefix="transformer", network_alphas=network_alphas)
    assert not key_problems(messages), messages
    peft = SD3Transformer2DModel.from_pretrained(base).eval()
    peft.load_lora_adapter(world["out"], prefix="transformer", weight_name=PEFT_FILE)
    inputs = transformer_inputs(tconf)
    want = torch_forward(peft, inputs)
    err = rel_err(torch_forward(tm, inputs), want)
    assert err <= 1e-5, err
    assert rel_err(torch_forward(SD3Transformer2DModel.from_pretrained(base).eval(), inputs), want) > 1e-3


def test_export_and_load_lora_use_the_ema_weights(world, tmp_path, capsys):
    """A run that kept an EMA (`ema.decay > 0`) exports it and `load_lora(workdir)` loads it; `--noema` the raw."""
    workdir = str(tmp_path / "run")
    flat = save_workdir(workdir, world["folder"], ema=True)
    ema, _ = read_lora(workdir)
    raw, _ = read_lora(workdir, ema=False)
    assert ema.keys() == raw.keys() == flat.keys()
    for k, v in flat.items():
        np.testing.assert_array_equal(raw[k], v)
        np.testing.assert_array_equal(ema[k], 0.5 * v)

    def exported(out: str, *flags: str) -> tuple[dict, dict]:
        rc, err = run_export(capsys, f"--checkpoint={workdir}", f"--out={out}", "--format=peft", *flags)
        assert rc == 0, err
        with open(os.path.join(out, "export.json")) as f:
            record = json.load(f)
        with safe_open(os.path.join(out, PEFT_FILE), framework="np") as f:
            return record, {k: f.get_tensor(k) for k in f.keys()}

    record, with_ema = exported(str(tmp_path / "ema"))
    raw_record, without = exported(str(tmp_path / "raw"), "--noema")
    assert record["weights"] == "ema" and raw_record["weights"] == "raw"
    for k, v in without.items():  # A and B each halved
        np.testing.assert_allclose(with_ema[k], 0.5 * v, rtol=1e-6)
    with open(os.path.join(world["folder"], "transformer", "config.json")) as f:
        pairs, _ = read_lora_pairs(workdir, json.load(f))
    module = next(iter(pairs))
    np.testing.assert_array_equal(pairs[module][0], ema[f"{module}.lora_a"])


# --- self-describing files, the model card, the ComfyUI workflow (issue #27) ---


def file_metadata_of(path: str) -> dict[str, str]:
    with safe_open(path, framework="np") as f:
        return f.metadata() or {}


def test_files_carry_metadata(world, exported):
    """Every exported safetensors file: ModelSpec keys, the sampling recipe, provenance; the LoRA files also
    diffusers' `lora_adapter_metadata` with the alpha each file needs (rank for the PEFT file, whose lora_B holds
    the scale; the run's alpha for the ComfyUI one, as its `.alpha` keys)."""
    from conversion.lora import COMFYUI_FILE, LORA_ADAPTER_METADATA_KEY
    from flowsteer_jax.export import config_hash

    meta = read_lora(world["workdir"])[1]
    peft = file_metadata_of(os.path.join(world["out"], PEFT_FILE))
    comfy = file_metadata_of(os.path.join(world["out"], COMFYUI_FILE))
    fused = file_metadata_of(os.path.join(world["out"], "transformer", "diffusion_pytorch_model.safetensors"))
    for md in (peft, comfy, fused):
        assert md["format"] == "pt" and md["modelspec.sai_model_spec"] == "1.0.0"
        assert md["modelspec.implementation"] == "diffusers" and md["modelspec.title"]
        side = meta["transformer_config"]["sample_size"] * 8  # latents x SD3's VAE factor
        assert md["modelspec.resolution"] == f"{side}x{side}"
        assert json.loads(md["flowsteer.sigmas"]) == [1.0, 0.9, 0.75, 0.5, 0.0]
        assert (md["flowsteer.steps"], md["flowsteer.shift"], md["flowsteer.schedule"]) == ("4", "3", "rectified")
        assert md["flowsteer.guidance_scale"] == "1.0" and "CFG off" in md["modelspec.usage_hint"]
        assert "sigmas=[1.0, 0.9, 0.75, 0.5]" in md["modelspec.usage_hint"]
        assert md["flowsteer.step"] == str(STEP) and md["flowsteer.config_sha256"] == config_hash(meta["config"])
        # an older checkpoint (no base_fingerprint, no commit in its meta): said so, not filled in
        assert md["flowsteer.base_fingerprint"] == md["flowsteer.commit"] == "unrecorded"
    assert peft["modelspec.architecture"] == comfy["modelspec.architecture"] == "stable-diffusion-3/lora"
    assert fused["modelspec.architecture"] == "stable-diffusion-3" and LORA_ADAPTER_METADATA_KEY not in fused
    with safe_open(os.path.join(world["out"], PEFT_FILE), framework="np") as f:
        modules = sorted({k.removeprefix("transformer.").split(".lora_")[0] for k in f.keys()})
    want = {"transformer.r": RANK, "transformer.target_modules": modules}
    assert json.loads(peft[LORA_ADAPTER_METADATA_KEY]) == {**want, "transformer.lora_alpha": RANK}
    assert json.loads(comfy[LORA_ADAPTER_METADATA_KEY]) == {**want, "transformer.lora_alpha": ALPHA}
    with safe_open(os.path.join(world["out"], COMFYUI_FILE), framework="np") as f:
        assert {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")} == {ALPHA}


def test_metadata_alpha_same_strength_in_diffusers_and_ours(world, exported, student, ours, tmp_path):
    """A PEFT file whose scale is only in `lora_adapter_metadata` (lora_B unscaled, lora_alpha = the run's alpha:
    what diffusers' own `save_lora_weights` writes): diffusers and `SD3Pipeline.load_lora` apply alpha / r, and
    both equal the student (ours bit for bit: / 2 then x 2 is exact)."""
    from conversion.lora import LORA_ADAPTER_METADATA_KEY

    model, meta = student
    with safe_open(os.path.join(world["out"], PEFT_FILE), framework="np") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        md = f.metadata()
    unscaled = {k: v / np.float32(ALPHA / RANK) if ".lora_B." in k else v for k, v in sd.items()}
    config = json.loads(md[LORA_ADAPTER_METADATA_KEY])
    path = str(tmp_path / "alpha_in_metadata.safetensors")
    save_file(
        unscaled, path, metadata={LORA_ADAPTER_METADATA_KEY: json.dumps({**config, "transformer.lora_alpha": ALPHA})}
    )
    inputs = transformer_inputs(meta["transformer_config"])
    want = ours_forward(model, inputs)
    ours.load_lora(path)
    np.testing.assert_array_equal(ours_forward(ours.transformer, inputs), want)
    tm = SD3Transformer2DModel.from_pretrained(os.path.join(world["folder"], "transformer")).eval()
    tm.load_lora_adapter(str(tmp_path), prefix="transformer", weight_name=os.path.basename(path))
    assert tm.peft_config["default_0"].lora_alpha == ALPHA and tm.peft_config["default_0"].r == RANK
    assert rel_err(torch_forward(tm, inputs), want) <= 1e-4


def test_adapter_metadata_checks(world, exported):
    """PEFT's per-module scale from the metadata: patterns (matched as peft's get_pattern_key), rsLoRA, LoraConfig
    defaults; and the refusals: DoRA, rank disagreeing with the arrays, an .alpha key besides the metadata."""
    from conversion.lora import adapter_scales

    modules = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "proj_out"]
    md = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"attn.to_k": 2}}
    md["transformer.rank_pattern"] = {"proj_out": 2}
    want = {modules[0]: (2.0, 4), modules[1]: (0.5, 4), modules[2]: (4.0, 2)}
    assert adapter_scales(json.dumps(md), modules) == want
    rs = {"transformer.r": 16, "transformer.lora_alpha": 8, "transformer.use_rslora": True}
    assert adapter_scales(json.dumps(rs), modules[:1]) == {modules[0]: (2.0, 16)}
    assert adapter_scales(json.dumps({"transformer.r": 8}), modules[:1]) == {modules[0]: (1.0, 8)}
    assert adapter_scales(json.dumps({"text_encoder.r": 8}), modules) is None
    with pytest.raises(ConversionError, match="DoRA"):
        adapter_scales(json.dumps({"transformer.use_dora": True}), modules)
    with pytest.raises(ConversionError, match="not JSON"):
        adapter_scales("{", modules)

    tconf = read_lora(world["workdir"])[1]["transformer_config"]
    with safe_open(os.path.join(world["out"], PEFT_FILE), framework="np") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    flat, _, _ = from_state_dict(sd, tconf, json.dumps({"transformer.r": RANK, "transformer.lora_alpha": 2 * RANK}))
    plain, _, _ = from_state_dict(sd, tconf)
    for k in flat:
        np.testing.assert_array_equal(flat[k], plain[k] * (2.0 if k.endswith("lora_b") else 1.0))
    with pytest.raises(ConversionError, match=f"rank {RANK}, but lora_adapter_metadata says r = 8"):
        from_state_dict(sd, tconf, json.dumps({"transformer.r": 8}))
    module = next(k for k in sd if k.endswith(".lora_A.weight")).removesuffix(".lora_A.weight")
    with pytest.raises(ConversionError, match="an .alpha key and lora_adapter_metadata both"):
        from_state_dict({**sd, f"{module}.alpha": np.float32(4)}, tconf, json.dumps({"transformer.r": RANK}))


def front_matter_of(readme: str) -> dict:
    """The model card's YAML front matter as huggingface_hub's ModelCard parses it."""
    from huggingface_hub import ModelCard

    return ModelCard(readme).data.to_dict()


def results_rows(world) -> dict:
    """An evaluate results.json: this checkpoint's step (and another), its base, and an image-folder row."""
    from conversion.safetensors_io import weights_fingerprint

    fp = weights_fingerprint(os.path.join(world["folder"], "transformer"))
    workdir = os.path.abspath(world["workdir"])

    def row(label, nfe, lora, step, pick, fingerprint=fp):
        sampling = {"lora": lora, "lora_step": step, "steps": 4}
        prov = {"sampling": sampling, "transformer_fingerprint": fingerprint}
        return {"label": label, "nfe": nfe, "metrics": {"pickscore": pick, "clip_score": 30.0}, "provenance": prov}

    return {
        "rows": [
            row("teacher", "28x2", None, None, 22.5),
            row("other base", "28x2", None, None, 1.0, fingerprint="0" * 16),
            row("student", "4x1", workdir, STEP, 22.25),
            row("older step", "4x1", workdir, STEP - 1, 20.0),
            {"label": "folder", "nfe": "—", "metrics": {"pickscore": 9.0}, "provenance": {"images": {}}},
        ]
    }


def test_model_card(world, exported, tmp_path, capsys):
    """README.md: YAML front matter the hub tools parse (base_model, adapter relation, library, licence of a
    published base, tags), the paper, the runnable diffusers recipe with sigmas=, and the evaluate table of this
    checkpoint step (plus its base) when --results names one; a results file without this step: one line, exit 2."""
    from flowsteer_jax.export import base_model_id, front_matter

    card = front_matter_of(open(os.path.join(world["out"], "README.md")).read())
    assert "base_model" not in card  # a local base folder: no hub id to name
    assert card["library_name"] == "diffusers" and card["pipeline_tag"] == "text-to-image"
    assert {"lora", "sd3", "flowsteer"} <= set(card["tags"])

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(results_rows(world)))
    out = tmp_path / "card"
    base = "stabilityai/stable-diffusion-3-medium-diffusers"
    ck = f"--checkpoint={world['workdir']}"
    rc, err = run_export(
        capsys, ck, f"--out={out}", "--format=peft", f"--base_model={base}", f"--results={tmp_path / 'eval'}"
    )
    assert rc == 0, err
    readme = (out / "README.md").read_text()
    card = front_matter_of(readme)
    assert card["base_model"] == base and card["base_model_relation"] == "adapter"
    assert "FlowSteer (Ke et al., CVPR 2026)" in readme
    code = readme.split("```python\n")[1].split("```")[0]
    assert f'from_pretrained("{base}"' in code and "sigmas = [1.0, 0.9, 0.75, 0.5]" in code
    assert "num_inference_steps=4, guidance_scale=0.0, sigmas=sigmas" in code
    compile(code, "README.md", "exec")  # runnable Python
    table = readme.split("## Evaluation\n\n")[1].split("\n\n")[0].splitlines()
    assert table[0] == "| method | NFE | clip_score | pickscore |"
    assert table[2:] == ["| teacher | 28x2 | 30 | 22.5 |", "| student | 4x1 | 30 | 22.25 |"]
    meta = file_metadata_of(str(out / PEFT_FILE))
    assert base in meta["modelspec.description"] and base in meta["modelspec.title"]

    # a published shape gets its licence; a hub cache path names its base
    sd3m = {"num_layers": 24, "caption_projection_dim": 1536, "qk_norm": None, "sample_size": 128}
    assert "license_name: stabilityai-ai-community" in front_matter(sd3m, base)
    cache = tmp_path / "hub" / "models--stabilityai--stable-diffusion-3.5-large" / "snapshots" / "abc123"
    cache.mkdir(parents=True)
    assert base_model_id(str(cache), None) == "stabilityai/stable-diffusion-3.5-large"
    assert base_model_id(str(cache), "me/mine") == "me/mine" and base_model_id(str(tmp_path), None) is None

    rows = results_rows(world)
    rows["rows"] = [r for r in rows["rows"] if r["label"] != "student"]
    (tmp_path / "eval" / "results.json").write_text(json.dumps(rows))
    rc, err = run_export(capsys, ck, f"--out={tmp_path / 'none'}", f"--results={tmp_path / 'eval'}")
    assert rc == 2 and len(err) == 1 and f"no row evaluates {world['workdir']} at step {STEP}" in err[0], err
    assert not os.path.exists(tmp_path / "none")


# ComfyUI's nodes the workflow uses: required inputs and outputs, from ComfyUI's source (nodes.py:
# CheckpointLoaderSimple, LoraLoaderModelOnly, CLIPTextEncode, KSampler, VAEDecode, SaveImage;
# comfy_extras/nodes_model_advanced.py: ModelSamplingSD3; comfy_extras/nodes_sd3.py: EmptySD3LatentImage).
COMFY_NODES = {
    "CheckpointLoaderSimple": ({"ckpt_name"}, ("MODEL", "CLIP", "VAE")),
    "LoraLoaderModelOnly": ({"model", "lora_name", "strength_model"}, ("MODEL",)),
    "ModelSamplingSD3": ({"model", "shift"}, ("MODEL",)),
    "CLIPTextEncode": ({"text", "clip"}, ("CONDITIONING",)),
    "EmptySD3LatentImage": ({"width", "height", "batch_size"}, ("LATENT",)),
    "KSampler": (
        {
            "model",
            "seed",
            "steps",
            "cfg",
            "sampler_name",
            "scheduler",
            "positive",
            "negative",
            "latent_image",
            "denoise",
        },
        ("LATENT",),
    ),
    "VAEDecode": ({"samples", "vae"}, ("IMAGE",)),
    "SaveImage": ({"images", "filename_prefix"}, ()),
}
# The type each linked input takes (same sources).
COMFY_INPUT_TYPES = {
    "model": "MODEL", "clip": "CLIP", "vae": "VAE", "positive": "CONDITIONING", "negative": "CONDITIONING",
    "latent_image": "LATENT", "samples": "LATENT", "images": "IMAGE",
}  # fmt: skip


def comfyui_simple_sigmas(steps: int, shift: float) -> np.ndarray:
    """What ComfyUI's KSampler(scheduler="simple") samples on after ModelSamplingSD3(shift), reimplemented from
    ComfyUI's source in float32 torch: comfy/model_sampling.py::ModelSamplingDiscreteFlow.set_parameters
    (timesteps 1000, multiplier 1000: `sigmas = time_snr_shift(shift, (arange(1, 1001) / 1000 * 1000) / 1000)`,
    `time_snr_shift(a, t) = a t / (1 + (a - 1) t)`) and comfy/samplers.py::simple_scheduler (`ss = len(sigmas) /
    steps`, `sigmas[-(1 + int(x * ss))]` for x < steps, then 0)."""
    t = (torch.arange(1, 1001, 1) / 1000) * 1000 / 1000
    table = t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)
    ss = len(table) / steps
    picked = [float(table[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]
    return torch.FloatTensor(picked).numpy()


def test_comfyui_workflow(world, exported):
    """workflow.json: ComfyUI's API format with its node and input names, every link to an existing node's output
    of the right type; the LoRA file it loads is in the export; and the sigmas ComfyUI derives from it (KSampler
    simple on ModelSamplingSD3) are our rectified grid, bit for bit (here; within float32 rounding for every step
    count that divides 1000, the ones the export writes a workflow for; another count gets none)."""
    from conversion.lora import COMFYUI_FILE
    from flowsteer_jax.export import comfyui_workflow
    from flowsteer_jax.flow import schedules

    wf = json.loads(open(os.path.join(world["out"], "workflow.json")).read())
    for node_id, node in wf.items():
        required, _ = COMFY_NODES[node["class_type"]]
        assert set(node["inputs"]) == required, (node_id, node)
        for name, value in node["inputs"].items():
            if isinstance(value, list):  # a link [node id, output index]
                source = wf[value[0]]["class_type"]
                assert COMFY_NODES[source][1][value[1]] == COMFY_INPUT_TYPES[name], (node_id, name, value)
    by_type = {n["class_type"]: n["inputs"] for n in wf.values()}
    assert set(by_type) == set(COMFY_NODES)
    lora, sampling, sampler = by_type["LoraLoaderModelOnly"], by_type["ModelSamplingSD3"], by_type["KSampler"]
    assert lora["lora_name"] == COMFYUI_FILE and lora["strength_model"] == 1.0
    assert os.path.isfile(os.path.join(world["out"], lora["lora_name"]))
    assert wf[sampler["model"][0]]["class_type"] == "ModelSamplingSD3"
    assert wf[sampling["model"][0]]["class_type"] == "LoraLoaderModelOnly"
    assert (sampler["steps"], sampler["cfg"], sampler["denoise"]) == (4, 1.0, 1.0)
    assert (sampler["sampler_name"], sampler["scheduler"]) == ("euler", "simple")
    implied = comfyui_simple_sigmas(sampler["steps"], sampling["shift"])
    np.testing.assert_array_equal(implied, schedules.sigmas(4, "rectified", 3.0))
    assert implied.tolist() == [1.0, np.float32(0.9), 0.75, 0.5, 0.0]

    # Other step counts that divide 1000: the same grid points; ComfyUI rounds each of its float32 operations, we
    # round once, so they differ by at most 2 units in the last place (6e-8 at sigma 0.5).
    for n in (1, 2, 5, 8, 10, 20, 25, 40, 50):
        for shift in (1.0, 3.0, 6.0):
            np.testing.assert_array_max_ulp(comfyui_simple_sigmas(n, shift), schedules.sigmas(n, "rectified", shift), 2)
    tconf = read_lora(world["workdir"])[1]["transformer_config"]
    config = {"distill": {"num_segments": 3, "shift": 3.0, "schedule": "rectified"}}
    assert np.abs(comfyui_simple_sigmas(3, 3.0) - schedules.sigmas(3, "rectified", 3.0)).max() > 1e-4
    assert comfyui_workflow(config, tconf, COMFYUI_FILE) is None
    config["distill"] |= {"num_segments": 4, "schedule": "diffusers"}
    assert comfyui_workflow(config, tconf, COMFYUI_FILE) is None


def test_provenance_commit_and_evaluated_step(world, exported, tmp_path, capsys):
    """The code commit training records, and the checkpoint's save time, reach the exported files (and the card);
    `source_commit` is this checkout's HEAD; evaluate's `lora_step` (what `read_results` matches) is the step a
    workdir LoRA loads."""
    import subprocess as sp

    from flowsteer_jax.checkpoint import source_commit
    from flowsteer_jax.evaluate import _workdir_step

    head = sp.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert source_commit().removesuffix("+dirty") == head
    extra = {"commit": "abc123+dirty", "time": 1733300000.0, "base_fingerprint": "0123456789abcdef"}
    workdir = with_meta(world["workdir"], str(tmp_path / "run"), **extra)
    rc, err = run_export(capsys, f"--checkpoint={workdir}", f"--out={tmp_path / 'out'}", "--format=peft")
    assert rc == 0, err
    md = file_metadata_of(str(tmp_path / "out" / PEFT_FILE))
    assert md["flowsteer.commit"] == "abc123+dirty" and md["flowsteer.base_fingerprint"] == "0123456789abcdef"
    assert md["modelspec.date"] == "2024-12-04T08:13:20Z"  # the checkpoint's save time: reproducible bytes
    assert "code commit `abc123+dirty`" in (tmp_path / "out" / "README.md").read_text()
    assert _workdir_step(world["workdir"]) == STEP
    assert _workdir_step(world["out"]) is None and _workdir_step(None) is None


def test_a_published_base_shape(world, exported, tmp_path, capsys, monkeypatch):
    """A base of a published SD3 shape (`KNOWN_BASES`, here the tiny shape posing as one): its ModelSpec
    architecture, its licence in the card, its all-in-one checkpoint in the workflow, and, its folder being local, a
    one-line note naming the hub id to pass as --base_model (not guessed into the card)."""
    from flowsteer_jax import export as export_mod

    tconf = read_lora(world["workdir"])[1]["transformer_config"]
    key = (tconf["num_layers"], tconf["caption_projection_dim"], tconf.get("qk_norm"), False)
    monkeypatch.setitem(export_mod.KNOWN_BASES, key, ("stable-diffusion-3-t", "org/tiny-sd3", "tiny_sd3.safetensors"))
    rc, err = run_export(capsys, f"--checkpoint={world['workdir']}", f"--out={tmp_path / 'out'}")
    assert rc == 0 and len(err) == 1 and "note: the model card names no base_model" in err[0], err
    assert "--base_model=org/tiny-sd3" in err[0]
    card = front_matter_of((tmp_path / "out" / "README.md").read_text())
    assert "base_model" not in card and card["license_name"] == "stabilityai-ai-community"
    assert file_metadata_of(str(tmp_path / "out" / PEFT_FILE))["modelspec.architecture"] == "stable-diffusion-3-t/lora"
    workflow = json.loads((tmp_path / "out" / "workflow.json").read_text())
    assert workflow["1"]["inputs"]["ckpt_name"] == "tiny_sd3.safetensors"
