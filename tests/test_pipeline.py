"""`SD3Pipeline` against diffusers' `StableDiffusion3Pipeline` on a tiny random saved pipeline (same noise).

Covers CFG on and off, both schedules (diffusers runs the rectified one when given
`sigmas=linspace(1, 0, n + 1)[:-1]`; it shifts them itself), latents and decoded images, and that the jitted
sampler is compiled once per shape and reused across schedules and guidance scales.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image

from flowsteer_jax import pipeline as pipeline_mod
from flowsteer_jax.pipeline import SD3Pipeline
from flowsteer_jax.tools.tiny_pipeline import write_tiny_pipeline
from tests.torch_reference import rel_err, to_np

PROMPTS = ["a photo of a red cat", "the blue cube on a sphere"]
MAX_SEQ = 16
STEPS = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd3_pipeline"))
    write_tiny_pipeline(folder)
    ref = StableDiffusion3Pipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ours = SD3Pipeline.from_pretrained(folder, dtype=jnp.float32)
    ours.folder = folder
    return ref, ours


def _noise(batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 16, 16, 16)).astype(np.float32)


def _diffusers(ref, schedule, steps, **kw):
    if schedule == "rectified":
        kw["sigmas"] = list(np.linspace(1.0, 0.0, steps + 1)[:-1])
    return ref(num_inference_steps=steps, max_sequence_length=MAX_SEQ, **kw).images


@pytest.mark.parametrize("schedule", ["diffusers", "rectified"])
def test_sigmas_match_diffusers_scheduler(pipes, schedule):
    ref, ours = pipes
    for n in (1, 4, 28):
        kw = {"sigmas": list(np.linspace(1.0, 0.0, n + 1)[:-1])} if schedule == "rectified" else {}
        ref.scheduler.set_timesteps(None if kw else n, **kw)
        # rectified: diffusers shifts in float32, we round the exact value once -> at most 1 ulp apart
        atol = 0 if schedule == "diffusers" else 1.2e-7
        np.testing.assert_allclose(ours.sigmas(n, schedule), to_np(ref.scheduler.sigmas), rtol=0, atol=atol)


@pytest.mark.parametrize(
    "schedule, guidance, negative",
    [("diffusers", 5.0, None), ("rectified", 4.0, ["a dog", "red"]), ("rectified", 0.0, None)],
)
def test_matches_diffusers(pipes, schedule, guidance, negative):
    ref, ours = pipes
    noise = _noise(len(PROMPTS))
    common = dict(guidance_scale=guidance, negative_prompt=negative)
    start = dict(prompt=PROMPTS, latents=torch.from_numpy(noise), **common)
    want_lat = _diffusers(ref, schedule, STEPS, output_type="latent", **start)
    want_img = _diffusers(ref, schedule, STEPS, output_type="np", **start)
    kw = dict(num_inference_steps=STEPS, schedule=schedule, latents=noise, max_sequence_length=MAX_SEQ, **common)
    got_lat = ours(PROMPTS, output_type="latent", **kw)
    got_img = ours(PROMPTS, output_type="np", **kw)
    assert got_lat.shape == tuple(want_lat.shape) and got_lat.dtype == jnp.float32
    assert got_img.shape == want_img.shape == (2, 32, 32, 3) and got_img.dtype == np.float32
    lat_err, img_err = rel_err(got_lat, to_np(want_lat)), rel_err(got_img, want_img)
    print(f"{schedule} w={guidance}: latents rel err {lat_err:.2e}, images rel err {img_err:.2e}")
    assert lat_err <= 1e-4 and img_err <= 1e-4
    assert got_img.min() >= 0 and got_img.max() <= 1


def test_compiled_once_and_reused(pipes):
    _, ours = pipes
    fn = pipeline_mod._denoise_decode
    kw = dict(num_inference_steps=STEPS, max_sequence_length=MAX_SEQ, output_type="latent")
    ours(PROMPTS, guidance_scale=3.0, schedule="diffusers", **kw)
    before = fn._cache_size()
    # other schedule, other guidance > 1, other seed: same compiled function
    ours(PROMPTS, guidance_scale=6.0, schedule="rectified", seed=3, **kw)
    ours(["a cat", "a dog"], guidance_scale=3.0, schedule="diffusers", seed=1, **kw)
    assert fn._cache_size() == before


def test_noise_seed_and_pil(pipes):
    _, ours = pipes
    kw = dict(num_inference_steps=2, guidance_scale=0.0, schedule="rectified", max_sequence_length=MAX_SEQ)
    shape = (3, 16, 16, 16)
    # image i's noise depends on (seed, i) only, not on the batch size
    np.testing.assert_array_equal(ours.noise(shape, 7)[:1], ours.noise((1, *shape[1:]), 7))
    a = np.asarray(ours(PROMPTS, seed=7, output_type="latent", **kw))
    np.testing.assert_array_equal(a, np.asarray(ours(PROMPTS, seed=7, output_type="latent", **kw)))
    assert not np.allclose(a, np.asarray(ours(PROMPTS, seed=8, output_type="latent", **kw)))
    images = ours(PROMPTS, seed=7, output_type="pil", **kw)
    assert len(images) == 2 and images[0].size == (32, 32) and images[0].mode == "RGB"
    with pytest.raises(ValueError, match="output_type"):
        ours(PROMPTS, output_type="tensor", **kw)
    with pytest.raises(ValueError, match="latents"):
        ours(PROMPTS, latents=np.zeros((3, 16, 16, 16), np.float32), **kw)


def test_sample_cli(pipes, tmp_path):
    from flowsteer_jax import sample

    folder = pipes[1].folder
    (tmp_path / "prompts.txt").write_text("a red cat\n# skipped\n\nthe blue cube\na dog\n")
    out = tmp_path / "out"
    argv = [f"--model={folder}", f"--prompts={tmp_path / 'prompts.txt'}", f"--out={out}", "--steps=2", "--batch=2"]
    assert sample.main([*argv, f"--max_sequence_length={MAX_SEQ}"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "00000.png",
        "00001.png",
        "00002.png",
        "flowsteer-output.json",
        "grid.png",
        "prompts.txt",
        "sample.log",
    ]
    assert Image.open(out / "grid.png").size == (64, 64)  # 3 images of 32x32 on a 2x2 grid


def test_batch_sharded_over_devices_matches_one_device(pipes):
    """4 fake CPU devices in a subprocess: the batch is split over 'data' and the result equals one device's."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), pipes[1].folder],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report)
    assert report["devices"] == 4 and report["shards"] == 4
    assert report["latent_rel_err"] <= 1e-5


def _sharding_worker(folder: str) -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from flowsteer_jax.parallel import make_mesh

    assert len(jax.devices()) == 4
    many = SD3Pipeline.from_pretrained(folder)  # several devices: a (4, 1, 1) data mesh by default
    one = SD3Pipeline.from_pretrained(folder, mesh=make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    prompts = PROMPTS * 2
    kw = dict(num_inference_steps=2, guidance_scale=4.0, schedule="rectified", seed=0, max_sequence_length=MAX_SEQ)
    lat_many, lat_one = many(prompts, output_type="latent", **kw), one(prompts, output_type="latent", **kw)
    report = dict(
        devices=len(jax.devices()),
        shards=len({s.device for s in lat_many.addressable_shards if s.data.shape[0] < len(prompts)}),
        latent_rel_err=rel_err(lat_many, lat_one),
    )
    print(json.dumps(report))


if __name__ == "__main__":
    _sharding_worker(sys.argv[1])
