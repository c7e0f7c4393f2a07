"""`SD3Pipeline`: diffusers' `StableDiffusion3Pipeline.__call__`, in JAX, for batch sampling.

    pipe = SD3Pipeline.from_pretrained("path/to/diffusers_sd3_folder", dtype=jnp.float32)
    latents = pipe(prompts, num_inference_steps=4, guidance_scale=0.0, schedule="rectified", output_type="latent")

- Text encoding runs through `SD3PromptEncoder` (each encoder jitted on its own), as diffusers' `encode_prompt`.
- The whole denoising loop (one `lax.scan` of Euler steps) and the VAE decode are one jitted function. It is
  compiled once per (batch, latent size, steps, CFG on/off, decode on/off) and reused: sigmas and the guidance
  scale are array arguments, so switching schedule or changing `guidance_scale > 1` does not recompile.
- `guidance_scale <= 1` runs one forward per step (the distilled student); `> 1` runs CFG as one batched forward
  of [uncond, cond], as diffusers does.
- The boundary speaks diffusers' layout: `latents=` takes NCHW noise (so diffusers and we can start from the
  same noise), `output_type="latent"` returns NCHW latents, `"np"` NHWC float32 images in [0, 1], `"pil"` a list
  of PIL images (`round(255 * x)`, as diffusers' `numpy_to_pil`).
- With several devices (or inside `jax.set_mesh`), the batch is sharded over the mesh's data axes.

LoRA: `pipe.load_lora(path, scale=1.0)` takes a training workdir (its latest orbax checkpoint), an exported folder
(`pytorch_lora_weights.safetensors`) or a `.safetensors` file in any published SD3 layout (PEFT/diffusers, kohya/SAI,
ComfyUI, OneTrainer: `conversion.lora.from_state_dict`). It swaps the named `nnx.Linear`s of `self.transformer`
for `LoRALinear`s in place (loading again replaces the previous adapters, never stacks) and calls
`self._refresh_transformer()` so the next call uses them.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from flowsteer_jax.flow.sampling import NUM_TRAIN_TIMESTEPS, Cond, model_velocity, sample
from flowsteer_jax.flow.schedules import KINDS, scheduler_settings
from flowsteer_jax.flow.schedules import sigmas as make_sigmas
from flowsteer_jax.models.loading import load_transformer, load_vae, pipeline_component, read_lora
from flowsteer_jax.models.lora import remove_lora, set_lora
from flowsteer_jax.models.mmdit import MMDiT
from flowsteer_jax.models.vae import AutoencoderKL
from flowsteer_jax.parallel import DEFAULT_RULES, MeshAxes, batch_sharding, current_mesh, make_mesh
from flowsteer_jax.text import SD3PromptEncoder

OUTPUT_TYPES = ("latent", "np", "pil")


@partial(jax.jit, static_argnames=("t_graph", "v_graph", "cfg", "decode", "num_train_timesteps"))
def _denoise_decode(
    t_graph,
    t_state,
    v_graph,
    v_state,
    latents: jax.Array,  # (B, C, h, w), diffusers' layout
    sigmas: jax.Array,  # (n + 1,)
    cond: Cond,  # {"prompt_embeds", "pooled"}
    uncond: Cond | None,
    guidance: jax.Array,  # ()
    *,
    cfg: bool,
    decode: bool,
    num_train_timesteps: int,
) -> tuple[jax.Array, jax.Array | None]:
    """Euler-integrate from `sigmas[0]` to `sigmas[-1]` (with CFG when `cfg`), then optionally decode.

    Returns (NCHW latents, NHWC images in [0, 1] float32 or None).
    """
    model_fn = model_velocity(nnx.merge(t_graph, t_state), num_train_timesteps)
    x = sample(model_fn, latents.transpose(0, 2, 3, 1), sigmas, cond, uncond, guidance if cfg else 0.0)
    images = None
    if decode:
        vae = nnx.merge(v_graph, v_state)
        # diffusers: vae.decode(latents / scaling_factor + shift_factor), then postprocess (x / 2 + 0.5).clamp(0, 1)
        images = vae.decode_latents(x.astype(vae.dtype))
        images = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return x.transpose(0, 3, 1, 2), images


def _as_list(prompts: str | list[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def to_pil(images: np.ndarray) -> list:
    """NHWC floats in [0, 1] -> PIL images, exactly as diffusers' `VaeImageProcessor.numpy_to_pil`."""
    from PIL import Image

    images = (np.asarray(images) * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(im.squeeze(), mode="L") for im in images]
    return [Image.fromarray(im) for im in images]


class SD3Pipeline:
    """Text encoders, MMDiT, VAE and scheduler settings of a diffusers SD3 folder; `__call__` samples a batch."""

    def __init__(
        self,
        text: SD3PromptEncoder,
        transformer: MMDiT,
        vae: AutoencoderKL,
        *,
        shift: float = 3.0,
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
        mesh: Mesh | None = None,
        rules: dict[str, MeshAxes] = DEFAULT_RULES,
    ):
        self.text, self.transformer, self.vae = text, transformer, vae
        self.shift, self.num_train_timesteps = float(shift), int(num_train_timesteps)
        self.mesh, self.rules = mesh, rules
        self.dtype = transformer.dtype
        # diffusers: 2 ** (len(vae.config.block_out_channels) - 1); default size = sample_size * that
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.default_sample_size = transformer.config.sample_size
        self._vae_split = nnx.split(vae)
        self._refresh_transformer()

    def _refresh_transformer(self) -> None:
        """Re-split the transformer after its weights changed (the LoRA hook point)."""
        self._transformer_split = nnx.split(self.transformer)

    @classmethod
    def from_pretrained(
        cls,
        folder: str,
        dtype: jnp.dtype = jnp.float32,
        *,
        t5: bool = True,
        mesh: Mesh | None = None,
        rules: dict[str, MeshAxes] = DEFAULT_RULES,
        implementation: str | None = None,
    ) -> SD3Pipeline:
        """Load every component of a diffusers SD3 folder (converted on load), all in `dtype`.

        `t5=False` (or a folder saved without T5) leaves T5 out, its tokens zeros, as diffusers' `text_encoder_3=None`.
        `mesh`: defaults to the one set with `jax.set_mesh`, else a data-parallel mesh over all devices when
        there are several, else none.
        """
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise FileNotFoundError(f"{folder}: no model_index.json (not a diffusers pipeline folder)")
        if mesh is None:
            mesh = current_mesh()
        if mesh is None and jax.device_count() > 1:
            mesh = make_mesh((-1, 1, 1))
        kw = dict(mesh=mesh, rules=rules)
        text = SD3PromptEncoder.from_pretrained(folder, dtype, t5=t5, mesh=mesh, implementation=implementation)
        transformer = load_transformer(
            pipeline_component(folder, "transformer"), dtype, implementation=implementation, **kw
        )
        vae = load_vae(pipeline_component(folder, "vae"), dtype, **kw)
        settings = scheduler_settings(folder)
        return cls(text, transformer, vae, mesh=mesh, rules=rules, **settings)

    # --- LoRA ---

    def load_lora(self, path: str, scale: float = 1.0) -> list[str]:
        """Apply a student LoRA to the transformer; returns the adapted Flax module paths.

        `path`: a training workdir (the latest orbax checkpoint in `checkpoints/`; the run's `alpha / rank` is
        applied and its transformer config must equal ours), a folder with `pytorch_lora_weights.safetensors`, or
        a `.safetensors` file in a layout `conversion.lora.from_state_dict` reads (PEFT/diffusers, kohya/SAI
        `lora_unet_*` with fused qkv and alpha, ComfyUI `diffusion_model.*`, OneTrainer `lora_transformer_*`).
        `scale` multiplies the adapters' effect. Loading again replaces the previous adapters. Strict: a file of
        no known layout, or a key that maps to no Linear of this transformer, raises ConversionError.
        """
        pairs, layer_scale = read_lora(path, self.transformer.config, scale)
        adapted = set_lora(self.transformer, pairs, layer_scale, mesh=self.mesh, rules=self.rules)
        self._refresh_transformer()
        return adapted

    def remove_lora(self) -> list[str]:
        """Back to the base transformer (the adapters `load_lora` set are dropped); returns the paths it touched."""
        removed = remove_lora(self.transformer)
        self._refresh_transformer()
        return removed

    # --- helpers ---

    def sigmas(self, num_inference_steps: int, schedule: str = "diffusers") -> np.ndarray:
        """The `num_inference_steps + 1` sigmas this pipeline integrates along (float32, ending at 0)."""
        return make_sigmas(num_inference_steps, schedule, self.shift, num_train_timesteps=self.num_train_timesteps)

    def _latent_shape(self, batch: int, height: int | None, width: int | None) -> tuple[int, int, int, int]:
        f = self.vae_scale_factor
        height = height or self.default_sample_size * f
        width = width or self.default_sample_size * f
        mult = f * self.transformer.config.patch_size
        if height % mult or width % mult:
            raise ValueError(f"height and width must be divisible by {mult}, got {height}x{width}")
        return batch, self.transformer.config.in_channels, height // f, width // f

    def _place(self, tree: Any) -> Any:
        """Shard the leading (batch) axis over the mesh's data axes when it divides evenly; else replicate."""
        if self.mesh is None:
            return tree
        sharding = batch_sharding(self.mesh, self.rules)
        first = sharding.spec[0] if len(sharding.spec) else None
        n = 1
        for axis in (first,) if isinstance(first, str) else first or ():
            n *= self.mesh.shape[axis]
        if n <= 1 or any(x.shape[0] % n for x in jax.tree.leaves(tree)):
            sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.device_put(tree, sharding)

    def noise(self, shape: tuple[int, ...], seed: int, start: int = 0) -> jax.Array:
        """Standard normal NCHW noise for images `start, ..., start + shape[0] - 1`; image `i` depends only on
        (seed, i), not on the batch size or how a prompt list is cut into batches."""
        keys = jax.random.split(jax.random.key(seed), start + shape[0])[start:]
        return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys)

    # --- sampling ---

    def __call__(
        self,
        prompts: str | list[str],
        num_inference_steps: int = 28,
        guidance_scale: float = 7.0,
        schedule: str = "diffusers",
        latents: Any = None,
        seed: int = 0,
        first_index: int = 0,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | list[str] | None = None,
        max_sequence_length: int = 256,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
    ):
        """Sample one image per prompt (times `num_images_per_prompt`).

        Args:
          prompts: a prompt or a list of prompts.
          schedule: "diffusers" (bit-compatible with `FlowMatchEulerDiscreteScheduler`) or "rectified".
          latents: optional NCHW starting noise (numpy, JAX or torch), diffusers' layout; else from `seed`.
          first_index: the global index of the first image (its noise is `noise(..., seed, first_index)`), so a
            prompt list sampled batch by batch gets the same images as in one call.
          guidance_scale: CFG weight; `<= 1` disables CFG (one forward per step), as in diffusers.

        Returns:
          "latent": NCHW latents (jax.Array); "np": NHWC float32 numpy images in [0, 1]; "pil": list of PIL images.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if schedule not in KINDS:
            raise ValueError(f"schedule must be one of {KINDS}, got {schedule!r}")
        prompts = _as_list(prompts)
        batch = len(prompts) * num_images_per_prompt
        cfg = guidance_scale > 1
        emb = self.text.encode_prompt(
            prompts,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=cfg,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
        )
        shape = self._latent_shape(batch, height, width)
        if latents is None:
            latents = self.noise(shape, seed, first_index)
        else:
            if hasattr(latents, "detach"):  # a torch tensor
                latents = latents.detach().float().cpu().numpy()
            latents = jnp.asarray(latents)
            want = (batch, shape[1])
            if latents.ndim != 4 or latents.shape[:2] != want:
                raise ValueError(f"latents must be NCHW with (batch, channels) = {want}, got shape {latents.shape}")
        # diffusers casts the noise to the prompt embeddings' dtype (prepare_latents)
        latents = latents.astype(self.dtype)
        cond = {"prompt_embeds": emb.prompt_embeds, "pooled": emb.pooled_prompt_embeds}
        uncond = {"prompt_embeds": emb.negative_prompt_embeds, "pooled": emb.negative_pooled_prompt_embeds}
        uncond = uncond if cfg else None
        latents, cond, uncond = self._place((latents, cond, uncond))
        sigmas = jnp.asarray(self.sigmas(num_inference_steps, schedule))
        t_graph, t_state = self._transformer_split
        v_graph, v_state = self._vae_split
        out, images = _denoise_decode(
            t_graph,
            t_state,
            v_graph,
            v_state,
            latents,
            sigmas,
            cond,
            uncond,
            jnp.asarray(guidance_scale, jnp.float32),
            cfg=bool(cfg),
            decode=output_type != "latent",
            num_train_timesteps=self.num_train_timesteps,
        )
        if output_type == "latent":
            return out
        images = np.asarray(jax.device_get(images), np.float32)
        return images if output_type == "np" else to_pil(images)
