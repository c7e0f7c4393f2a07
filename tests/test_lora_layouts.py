"""Third-party SD3 LoRA layouts (`conversion/lora.py::from_state_dict`, `to_layout`) and loading them.

One set of random LoRA weights on the tiny models, written as PEFT, kohya/SAI (fused qkv, alpha != rank),
ComfyUI (SAI names) and OneTrainer files: each reads back to the same weights, a file read and written again is the
same file, SAI's names agree with diffusers' own SAI-checkpoint converter, and `SD3Pipeline.load_lora` of each gives
the same transformer forward and the same images.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.numpy import save_file

from conversion.errors import ConversionError
from conversion.lora import LAYOUTS, from_state_dict, layout_modules, linear_modules, to_comfyui, to_layout
from flowsteer_jax import evaluate, sample
from flowsteer_jax.pipeline import SD3Pipeline
from flowsteer_jax.tools.tiny_pipeline import write_tiny_pipeline
from tests.test_lora import TINY

RANK, ALPHA = 4, 2.0  # alpha / rank = 1/2: kohya's "halved" strength, exact in float32
CONFIG = TINY.to_diffusers()  # 3 blocks, block 0 with SD3.5's second attention, the last block context_pre_only


def random_lora(config: dict, *, shared: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random `lora_a`/`lora_b` on every Linear. `shared`: the parts of one SAI Linear (q, k, v) share their A, as a
    LoRA trained on SAI's fused qkv does; else every module has its own A, as one trained here does."""
    r = np.random.default_rng(seed)
    flat = {}
    for parts in layout_modules(config, "kohya").values():
        a = None
        for path, _ in parts:
            d_in, d_out = linear_modules(config)[path].flax_shape
            a = a if shared and a is not None else r.standard_normal((d_in, RANK)).astype(np.float32)
            flat[f"{path}.lora_a"] = a
            flat[f"{path}.lora_b"] = r.standard_normal((RANK, d_out)).astype(np.float32)
    assert len(flat) == 2 * len(linear_modules(config))  # SAI's names cover every Linear of the transformer
    return flat


def deltas(flat: dict[str, np.ndarray], scale: float = 1.0) -> dict[str, np.ndarray]:
    paths = {k.rsplit(".", 1)[0] for k in flat}
    return {p: scale * flat[f"{p}.lora_a"].astype(np.float64) @ flat[f"{p}.lora_b"] for p in paths}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("alpha", [None, ALPHA])
def test_each_layout_round_trips_both_ways(layout, alpha):
    for shared in (True, False):
        flat = random_lora(CONFIG, shared=shared)
        file = to_layout(flat, 1.5, CONFIG, layout, alpha=alpha)
        back, rank, detected = from_state_dict(file, CONFIG)
        assert detected == layout
        want, got = deltas(flat, 1.5), deltas(back)
        assert want.keys() == got.keys()
        for p in want:
            np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-5, err_msg=p)
        fused = LAYOUTS[layout][1] == "sai" and not shared
        assert rank == (3 * RANK if fused else RANK)  # distinct q/k/v downs are stacked: block-diagonal up
        # the other way: a file read and written again is the same file, bit for bit
        again = to_layout(back, 1.0, CONFIG, layout, alpha=alpha)
        assert again.keys() == file.keys()
        for k in file:
            if shared or alpha is None or not fused:  # (else alpha / 12 is not a power of two)
                np.testing.assert_array_equal(again[k], file[k], err_msg=k)
    if layout == "kohya":
        up = file["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"]
        assert up.shape == (3 * 16, 3 * RANK) and "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight" in file
        assert ("lora_unet_joint_blocks_0_x_block_attn_qkv.alpha" in file) == (alpha is not None)


def test_the_exports_comfyui_file_reads_back():
    """`export --format=comfyui` writes `to_comfyui` (alpha 8, rank 4: scale 2); it loads as the `onetrainer` layout."""
    flat = random_lora(CONFIG, shared=False)
    back, rank, layout = from_state_dict(to_comfyui(flat, 8.0, CONFIG), CONFIG)
    assert (layout, rank) == ("onetrainer", RANK) and back.keys() == flat.keys()
    for k in flat:
        np.testing.assert_array_equal(back[k], flat[k] * (2.0 if k.endswith("lora_b") else 1.0), err_msg=k)


def test_sai_names_agree_with_diffusers_sai_converter():
    """Each kohya module's delta, put into an SAI checkpoint and converted by diffusers' own SAI -> diffusers
    converter (its qkv split, its scale/shift swap), lands on the diffusers Linear we apply it to."""

    class Checkpoint(dict):  # only the LoRA'd weights: the converter's other tensors are zeros
        def pop(self, key, *default):
            return super().pop(key) if key in self else torch.zeros(6)

    flat = random_lora(CONFIG, shared=False)
    file = to_layout(flat, 1.0, CONFIG, "kohya", alpha=ALPHA)
    ckpt = Checkpoint()
    for stem in layout_modules(CONFIG, "comfyui"):
        kohya = "lora_unet_" + stem.removeprefix("diffusion_model.").replace(".", "_")
        down, up = file[f"{kohya}.lora_down.weight"], file[f"{kohya}.lora_up.weight"]
        delta = up.astype(np.float64) @ down * ALPHA / down.shape[0]
        ckpt[stem.removeprefix("diffusion_model.") + ".weight"] = torch.from_numpy(delta)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(ckpt)
    for path, want in deltas(flat).items():
        got = converted[linear_modules(CONFIG)[path].torch_key].numpy().T
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=path)


def test_unknown_layout_is_one_line_naming_an_example_key():
    flat = random_lora(CONFIG, shared=True)
    lycoris = {k.replace("lora_unet_", "lycoris_"): v for k, v in to_layout(flat, 1.0, CONFIG, "kohya").items()}
    with pytest.raises(ConversionError, match=r"^not an SD3 .*\(peft, kohya, comfyui, onetrainer\); example key 'lyco"):
        from_state_dict(lycoris, CONFIG)
    te = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((4, 8), np.float32)}
    with pytest.raises(ConversionError, match="text-encoder LoRAs are not applied"):
        from_state_dict({**to_layout(flat, 1.0, CONFIG, "kohya"), **te}, CONFIG)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd3_layouts"))
    write_tiny_pipeline(folder, with_t5=False)
    return folder


@pytest.fixture(scope="module")
def pipe(folder):
    return SD3Pipeline.from_pretrained(folder, dtype=jnp.float32, t5=False)


def test_load_lora_each_layout_samples_the_same_images(pipe, tmp_path):
    """A kohya-layout LoRA and a ComfyUI-layout LoRA (and a OneTrainer one) of the same weights sample the same
    images as the PEFT file; a kohya file's alpha / rank = 1/2 applies its up matrix at half strength."""
    config = pipe.transformer.config.to_diffusers()
    flat = random_lora(config, shared=True, seed=1)
    flat = {k: v * np.float32(0.05) for k, v in flat.items()}  # a LoRA that changes the images but not wildly
    files = {
        "peft": to_layout(flat, 1.0, config, "peft"),
        "peft_half": to_layout(flat, 0.5, config, "peft"),
        "kohya": to_layout(flat, 1.0, config, "kohya", alpha=ALPHA),
        "comfyui": to_layout(flat, 1.0, config, "comfyui"),  # ComfyUI's LoRA save writes no alpha keys
        "onetrainer": to_layout(flat, 1.0, config, "onetrainer", alpha=ALPHA),
    }
    # kohya's alpha by hand: the up matrix as trained (not pre-divided by alpha / rank), applied at half strength
    kohya = to_layout(flat, 1.0, config, "kohya")
    kohya.update({k.replace(".lora_up.weight", ".alpha"): np.asarray(ALPHA, np.float32) for k in kohya if "_up" in k})
    files["kohya_halved"] = kohya
    kw = dict(num_inference_steps=2, guidance_scale=0.0, schedule="rectified", output_type="np", max_sequence_length=8)
    images = {}
    for name, state in files.items():
        path = str(tmp_path / f"{name}.safetensors")
        save_file(state, path)
        pipe.load_lora(path)
        images[name] = np.asarray(pipe(["a photo of a red cat"], **kw))
    pipe.remove_lora()

    assert np.abs(images["peft_half"] - images["peft"]).max() > 1e-2  # the LoRA's strength shows in the images
    for name in ("kohya", "comfyui", "onetrainer"):
        np.testing.assert_array_equal(images[name], images["peft"], err_msg=name)
    np.testing.assert_array_equal(images["kohya_halved"], images["peft_half"])

    bad = str(tmp_path / "lycoris.safetensors")
    save_file({"lycoris_joint_blocks_0_x_block_attn_qkv.lora_up.weight": np.zeros((48, 4), np.float32)}, bad)
    with pytest.raises(ConversionError) as e:
        pipe.load_lora(bad)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{bad}: not an SD3 transformer LoRA")
    assert "lycoris_joint_blocks_0_x_block_attn_qkv.lora_up.weight" in str(e.value)


def test_sample_and_evaluate_refuse_an_unknown_layout_before_any_model_loads(folder, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the --lora check")

    monkeypatch.setattr(SD3Pipeline, "from_pretrained", no_model)
    monkeypatch.setattr(evaluate, "Scorers", no_model)
    bad = str(tmp_path / "lycoris.safetensors")
    save_file({"lycoris_joint_blocks_0_x_block_attn_qkv.lora_up.weight": np.zeros((48, 4), np.float32)}, bad)
    common = [f"--model={folder}", f"--lora={bad}", f"--out={tmp_path / 'out'}"]
    for program, argv in [
        (sample, ["--prompt=a cat", "--no_t5", *common]),
        (evaluate, ["--metrics=clip", f"--weights={tmp_path}", *common]),
    ]:
        assert program.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith(f"{program.PROG}: error: --lora={bad}: {bad}: not an SD3 transformer LoRA"), err
        assert "example key 'lycoris_joint_blocks_0_x_block_attn_qkv.lora_up.weight'" in err[0]
    assert not os.path.exists(tmp_path / "out")
