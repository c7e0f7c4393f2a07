"""The digits world: data, tokenizers/encoders, classifier metrics, teacher pretraining (diffusers loads it),
sampling and the samples file format."""

from __future__ import annotations

import os

import jax  # noqa: F401  (before torch: conftest imports it first too)
import jax.numpy as jnp
import numpy as np
import pytest

from flowsteer_jax.digits import data, evaluate, teacher, text
from flowsteer_jax.flow.schedules import sigmas


def test_split_is_fixed_stratified_and_disjoint():
    train, test = data.split_indices("train"), data.split_indices("test")
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == 1797
    assert 0.28 < len(test) / 1797 < 0.32
    _, test_labels = data.single_digits("test")
    assert np.bincount(test_labels, minlength=10).min() >= 50  # stratified: every class held out
    data.split_indices.cache_clear()
    assert np.array_equal(data.split_indices("test"), test)  # recomputed: the same


def test_pairs_shapes_ranges_and_prompts():
    pairs = data.sample_pairs(np.random.default_rng(0), 64, "train")
    assert pairs.images.shape == (64, 8, 16, 1) and pairs.images.dtype == np.float32
    assert pairs.images.min() >= -1 and pairs.images.max() <= 1 and pairs.images.min() == -1
    assert pairs.digits.shape == (64, 2) and len(pairs.prompts) == 64
    for (left, right), prompt in zip(pairs.digits, pairs.prompts, strict=True):
        assert prompt in data.all_prompts()[1:]
        assert str(left) in prompt or data.WORDS[left] in prompt
        assert str(right) in prompt or data.WORDS[right] in prompt
    assert data.prompt_for(3, 7, 0) == "a 3 on the left and a 7 on the right"
    assert data.prompt_for(3, 7, 1) == "a 7 on the right and a 3 on the left"
    prompts = data.all_prompts()
    assert prompts[0] == "" and len(set(prompts)) == len(prompts) == 1 + 100 * data.NUM_PHRASINGS
    assert prompts[data.prompt_index(3, 7, 2)] == data.prompt_for(3, 7, 2)
    # the left half is a real digit of the given class, from the asked split
    images, labels = data.single_digits("test")
    fixed = data.sample_pairs(np.random.default_rng(1), 8, "test", digits=np.array([[4, 9]] * 8))
    left = data.scale(images[labels == 4])[..., None]
    assert all(any(np.array_equal(img[:, :8], ref) for ref in left) for img in fixed.images)
    x = fixed.images
    np.testing.assert_allclose(data.from_unit(data.to_unit(x)), x, atol=1e-6)
    assert data.to_unit(x).min() >= 0 and data.to_unit(x).max() <= 1


def test_tokenizer_ids_and_padding():
    clip, t5 = text.make_tokenizer("clip"), text.make_tokenizer("t5")
    vocab = text.vocabulary()
    kw = dict(padding="max_length", max_length=text.MAX_LENGTH, truncation=True, return_tensors="np")
    ids = clip(["3 then seven", ""], **kw).input_ids
    want = [vocab[text.BOS], vocab["3"], vocab["then"], vocab["seven"], vocab[text.EOS]]
    assert ids.shape == (2, 16) and ids[0, :5].tolist() == want and (ids[0, 5:] == vocab[text.PAD]).all()
    assert ids[1, :2].tolist() == [vocab[text.BOS], vocab[text.EOS]] and (ids[1, 2:] == 0).all()
    ids3 = t5(["Left 3 right 7"], **kw).input_ids[0]  # lower-cased; EOS only
    assert ids3[:5].tolist() == [vocab["left"], vocab["3"], vocab["right"], vocab["7"], vocab[text.EOS]]
    assert clip("a zebra").input_ids == [vocab[text.BOS], vocab["a"], vocab[text.UNK], vocab[text.EOS]]
    assert clip.model_max_length == t5.model_max_length == 16 and clip.eos_token_id == 3 and t5.pad_token_id == 0
    longest = max(len(clip(p).input_ids) for p in data.all_prompts())
    assert longest <= text.MAX_LENGTH  # no prompt of the world is truncated


def test_encoders_are_random_and_shapes():
    enc = text.make_encoders(0)
    assert enc.clip_l.config.hidden_size + enc.clip_g.config.hidden_size <= enc.t5.config.d_model
    for model in enc:
        for path, var in jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, nnx_state(model)))[0]:
            assert np.unique(var).size > 1, f"{path} is constant"  # no zero biases, no all-ones norms
    embeds, pooled = text.encode(["a 3 on the left and a 7 on the right", "a 7 on the left and a 3 on the right", ""])
    assert embeds.shape == (3, text.SEQ_LEN, text.JOINT_ATTENTION_DIM) and pooled.shape == (3, text.POOLED_DIM)
    assert embeds.dtype == pooled.dtype == np.float32
    assert np.abs(embeds[0] - embeds[1]).max() > 0.1 and np.abs(pooled[0] - pooled[1]).max() > 0.01
    clip_part = embeds[:, : text.MAX_LENGTH]
    assert (clip_part[..., 32 + 64 :] == 0).all()  # CLIP-L ++ CLIP-G zero-padded to the T5 width
    # the cached table equals a direct encoding; unknown prompts are encoded on the fly
    direct = text.encode_with(text._encoder(0), ["3 then 7"])
    cached = text.encode(["3 then 7"])
    np.testing.assert_allclose(cached[0], direct[0], atol=1e-5)
    np.testing.assert_allclose(cached[1], direct[1], atol=1e-5)
    unknown = text.encode(["a zebra"])
    assert (
        unknown[0].shape == (1, text.SEQ_LEN, text.JOINT_ATTENTION_DIM) and np.abs(unknown[1] - cached[1]).max() > 0.01
    )
    other = text.make_encoders(1).clip_l.text_model.embeddings.token_embedding.embedding[...]
    assert (
        np.abs(np.asarray(other) - np.asarray(enc.clip_l.text_model.embeddings.token_embedding.embedding[...])).max()
        > 0.1
    )


def nnx_state(model):
    from flax import nnx

    return nnx.state(model)


def test_classifier_accuracy_and_fd():
    real = evaluate.reference_pairs(500, seed=7)
    real_unit = data.to_unit(real.images)
    m = evaluate.evaluate(real_unit, real.digits)
    assert m["accuracy"] > 0.9, m
    noise = np.random.default_rng(0).uniform(size=(500, 8, 16))
    m_noise = evaluate.evaluate(noise, real.digits)
    assert m_noise["accuracy"] < 0.1, m_noise
    assert m["fd"] < 5 and m_noise["fd"] > 10 * m["fd"], (m, m_noise)
    wrong = evaluate.evaluate(real_unit, (real.digits + 1) % 10)
    assert wrong["accuracy"] < 0.05
    m_ref = evaluate.evaluate(real_unit, real.digits, reference=real_unit)
    assert m_ref["mse_to_reference"] == 0
    assert evaluate.evaluate(real_unit, real.digits, reference=noise[..., None])["mse_to_reference"] > 0.05


def test_eval_set_is_fixed_and_balanced():
    a, b = evaluate.eval_set(200), evaluate.eval_set(200)
    assert a.prompts == b.prompts and np.array_equal(a.noise, b.noise) and np.array_equal(a.digits, b.digits)
    assert a.noise.shape == (200, 8, 16, 1) and a.digits.shape == (200, 2)
    pairs = a.digits[:, 0] * 10 + a.digits[:, 1]
    assert (np.bincount(pairs, minlength=100) == 2).all()
    assert not np.array_equal(evaluate.eval_set(200, seed=1).noise, a.noise)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("digits") / "teacher")
    model = teacher.pretrain_teacher(folder, steps=3, batch_size=8, num_layers=1, progress=False)
    return folder, model


def test_teacher_folder_loads_in_diffusers_and_matches(tiny_teacher):
    folder, model = tiny_teacher
    assert teacher.is_complete(folder) and teacher.teacher_meta(folder)["steps"] == 3
    import torch
    from diffusers import SD3Transformer2DModel

    ref = SD3Transformer2DModel.from_pretrained(folder).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 16, 1)).astype(np.float32)
    t = np.array([10.0, 500.0, 990.0], np.float32)
    embeds, pooled = text.encode(["3 then 7", "", "left 1 right 2"])
    ours = np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(embeds), jnp.asarray(pooled)))
    with torch.no_grad():
        want = ref(
            hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
            timestep=torch.from_numpy(t),
            encoder_hidden_states=torch.from_numpy(embeds),
            pooled_projections=torch.from_numpy(pooled),
        ).sample.numpy()
    want = want.transpose(0, 2, 3, 1)
    assert np.abs(want).max() > 1e-3  # trained away from the zero init
    np.testing.assert_allclose(ours, want, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_teacher_training_is_deterministic_and_reused(tiny_teacher, tmp_path):
    folder, model = tiny_teacher
    again = teacher.pretrain_teacher(str(tmp_path / "again"), steps=3, batch_size=8, num_layers=1, progress=False)
    a, b = jax.tree.leaves(nnx_state(model)), jax.tree.leaves(nnx_state(again))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    loaded = teacher.ensure_teacher(folder, steps=10**9)  # complete: reused, not retrained
    c = jax.tree.leaves(nnx_state(loaded))
    assert all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left behind


def test_sample_shapes_ranges_and_npz(tiny_teacher, tmp_path):
    _, model = tiny_teacher
    es = evaluate.eval_set(12, seed=3)
    cond = text.encode_with_uncond(es.prompts)
    out = evaluate.sample(model, cond, es.noise, steps=2, guidance=3.0, batch_size=5, progress=False)
    assert out.shape == (12, 8, 16, 1) and out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    plain = evaluate.sample(model, cond[:2], es.noise, steps=2, batch_size=12, progress=False)
    assert plain.shape == out.shape and not np.allclose(plain, out)
    # one Euler step by hand, no CFG
    s = sigmas(1, "rectified", 3.0)
    one = evaluate.sample(model, [c[:4] for c in cond[:2]], es.noise[:4], steps=1, progress=False)
    v = model(
        jnp.asarray(es.noise[:4]), jnp.full((4,), s[0] * 1000), jnp.asarray(cond[0][:4]), jnp.asarray(cond[1][:4])
    )
    want = data.to_unit(np.asarray(es.noise[:4] + (s[1] - s[0]) * np.asarray(v)))
    np.testing.assert_allclose(one, want, atol=1e-5)
    with pytest.raises(ValueError, match="guidance"):
        evaluate.sample(model, cond[:2], es.noise, steps=2, guidance=3.0, progress=False)
    path = str(tmp_path / "s.npz")
    evaluate.save_samples(path, out, es.digits)
    with np.load(path) as f:
        assert set(f.files) == {"images", "digits"}
        assert f["images"].shape == (12, 8, 16) and f["images"].dtype == np.float32
        assert f["digits"].shape == (12, 2) and np.issubdtype(f["digits"].dtype, np.integer)
        np.testing.assert_array_equal(f["images"], out[..., 0])


def test_digits_run_end_to_end_and_ablation(tmp_path):
    """A shortened digits run (the README's first command with few steps): teacher pretraining, FlowSteer
    distillation, report, samples in the documented format; the trained student exports to diffusers; then
    the ablation runner on two Table 5 rows, a Table 4 row and Table 2, sharing the teacher."""
    import json

    from flowsteer_jax.digits import ablate
    from flowsteer_jax.train import train
    from tests.test_export import check_export
    from tests.test_train import _load_config

    config = _load_config("digits")
    short = dict(teacher_train_steps=20, eval_samples=40)
    config.digits.update(short)
    config.train.update(num_steps=3, batch_size=4)
    config.checkpoint.every_steps = 2
    workdir = str(tmp_path / "digits")
    out = train(config, workdir)
    assert out["step"] == 3 and not out["stopped"]
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    names = (
        "teacher_28_diffusers",
        "teacher_4_diffusers",
        "teacher_4_rectified",
        "teacher_4_rectified_nocfg",
        "student_4",
    )
    assert set(metrics["rows"]) == set(names)
    for name in names:
        with np.load(os.path.join(workdir, "samples", f"{name}.npz")) as f:
            assert f["images"].dtype == np.float32 and f["images"].shape == (40, 8, 16)
            assert 0 <= f["images"].min() and f["images"].max() <= 1
            assert f["digits"].shape == (40, 2) and np.issubdtype(f["digits"].dtype, np.integer)
        assert os.path.isfile(os.path.join(workdir, "samples", f"{name}.png"))
    report = open(os.path.join(workdir, "report.md")).read()
    assert "FlowSteer student, 4 steps, no CFG" in report and "| 4x1 |" in report
    errors = check_export(workdir, str(tmp_path / "export"))
    assert errors["adapter"] <= 1e-4 and errors["fused"] <= 1e-4, errors

    sets = [f"--set=digits.{k}={v}" for k, v in short.items()] + ["--set=train.batch_size=4"]
    code = ablate.main(
        ["--workdir", workdir, "--seeds=1", "--steps=2", "--tables=1,2,5,4", "--rows=perflow,gan_least_squares",
         "--set=digits.eval_samples=40", *sets]
    )  # fmt: skip
    assert code == 0
    table = open(os.path.join(workdir, "ablation.md")).read()
    assert "| PeRFlow |" in table and "| full (+feature matching) |" in table and "| 28 | rectified |" in table
    assert "## Table 4" in table and "| least-squares GAN loss |" in table  # "full" joined: Table 4 reads against it
    assert "## Table 1" in table and "| interpolated, t = 0.750 |" in table
    assert "| control: own sample, same eps, t = 0.500 |" in table and "## Comparisons" in table
    result = json.load(open(os.path.join(workdir, "ablation.json")))
    # Table 1: the teacher resumed at the 4-window rectified grid's inner boundaries (shift 3: 0.9, 0.75, 0.5)
    t1 = result["table1"]
    kinds = ("interpolated", "coupled", "uncoupled")
    assert set(t1) == {"trajectory"} | {f"{k}_{t}" for k in kinds for t in ("0.900", "0.750", "0.500")}
    assert "mse_to_reference" not in t1["trajectory"][0] and t1["interpolated_0.500"][0]["mse_to_reference"] > 0
    rows = result["rows"]
    assert set(rows) == {"perflow", "full", "gan_least_squares"}
    assert rows["gan_least_squares"][0]["accuracy"] >= 0 and rows["full"][0]["step"] == 2
    for name in ("perflow_seed0", "full_seed0", "teacher_1_diffusers_seed0", "table1_interpolated_0.900_seed0"):
        assert os.path.isfile(os.path.join(workdir, "samples", f"{name}.npz")), name
    # a second invocation with the same settings adds to the results (reusing the finished run as it is)
    again = ["--workdir", workdir, "--seeds=1", "--steps=2", "--tables=5", "--rows=perflow",
             "--set=digits.eval_samples=40", *sets]  # fmt: skip
    assert ablate.main(again) == 0
    result2 = json.load(open(os.path.join(workdir, "ablation.json")))
    assert set(result2["rows"]) == {"perflow", "full", "gan_least_squares"} and result2["table1"] == t1
    assert result2["rows"]["perflow"] == rows["perflow"] and len(result2["invocations"]) == 2
    assert "| interpolated, t = 0.750 |" in open(os.path.join(workdir, "ablation.md")).read()
    per_seed = json.load(open(os.path.join(workdir, "digits_ablation.json")))
    assert set(per_seed) == {"PeRFlow", "full", "gan_least_squares"}
    assert per_seed["PeRFlow"]["accuracy"] == [rows["perflow"][0]["accuracy"]]
    assert per_seed["full"]["mse_teacher"] == [rows["full"][0]["mse_to_reference"]]
    assert ablate.main(["--workdir", workdir, "--set=digits.nope=1"]) == 2
    assert ablate.main(["--workdir", workdir, "--tables=3"]) == 2


def test_stored_classifiers_are_the_fitted_ones():
    """The scoring classifiers are stored weights (machine-independent scores): refitted here they predict the same
    held-out labels (up to near-ties), and the stored file is what `classifier()` uses."""
    from flowsteer_jax.compose import evaluate as compose_evaluate
    from flowsteer_jax.digits import mlp

    images, labels = data.single_digits("test")
    x = images.reshape(len(images), -1) / 16.0
    stored, refit = evaluate.classifier(), evaluate.fit_classifier()
    assert os.path.isfile(evaluate.CLASSIFIER_FILE) and stored.w1.dtype == np.float64
    assert np.mean(stored.predict(x) == refit.predict(x)) > 0.99
    assert np.mean(stored.predict(x) == labels) > 0.9
    missing = mlp.load(str(os.path.join(os.path.dirname(evaluate.CLASSIFIER_FILE), "nope.npz")), lambda: refit)
    assert missing is refit  # a checkout without the file refits
    cells = compose_evaluate._cells_of(data.to_unit(compose_evaluate.reference_scenes(200).images))
    stored_c = compose_evaluate.classifier()
    assert os.path.isfile(compose_evaluate.CLASSIFIER_FILE)
    assert np.mean(stored_c.predict(cells) == compose_evaluate.fit_classifier().predict(cells)) > 0.99
