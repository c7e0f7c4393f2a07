"""The compositional digits world: scenes and prompts, the VAE (diffusers folder, SD3-style latent factors), the
classifier on held-out cells, scoring, and a shortened run of the trainer in the world."""

import json
import os

import numpy as np
import pytest

from conversion.training_checkpoint import CheckpointError
from flowsteer_jax.compose import data, evaluate, vae
from flowsteer_jax.digits import data as digits_data
from flowsteer_jax.digits import text


def test_prompts_and_scenes_match_their_spec(rng):
    prompts, spec = data.all_prompts(), data.spec()
    assert prompts[0] == "" and len(prompts) == len(set(prompts)) == 586 == len(spec.task)
    assert spec.task[0] == -1 and set(spec.task[1:]) == set(range(len(data.TASKS)))
    assert prompts[int(np.flatnonzero(spec.count == 4)[0])].startswith("four copies of")
    scenes = data.sample_scenes(rng, 300, "train")
    assert scenes.images.shape == (300, 24, 24, 3) and scenes.images.dtype == np.float32
    assert scenes.images.min() >= -1 and scenes.images.max() <= 1
    # empty cells are black; full ones hold ink of their colour
    crops = data.cell_crops(scenes.images)
    assert np.all(crops[scenes.cells < 0] == -1) and np.all(crops[scenes.cells >= 0].max((1, 2, 3)) > 0)
    assert np.array_equal(scenes.cells >= 0, scenes.colours >= 0)
    # every scene satisfies its prompt; a shifted prompt rarely does
    truth = evaluate.score_cells(scenes.cells, scenes.colours, scenes.prompt_ids)
    assert all(v == 1.0 for v in truth.values()), truth
    wrong = evaluate.score_cells(scenes.cells, scenes.colours, np.roll(scenes.prompt_ids, 1))
    assert wrong["accuracy"] < 0.1
    # the language covers every prompt word; the encoders embed all prompts once
    lang = text.Language(data.words(), prompts)
    assert "<unk>" not in text.make_tokenizer("clip", lang).tokenize(" ".join(data.words()))


def test_task_selection(rng):
    """A config's `tasks` picks the prompts trained on, the evaluation prompts and the FD reference's scenes."""
    import pytest

    assert data.task_ids("") == data.task_ids(None) == tuple(range(len(data.TASKS)))
    assert data.task_ids("single, two") == data.task_ids(("single", "two")) == (0, 1)
    with pytest.raises(ValueError, match="unknown tasks"):
        data.task_ids("single,shapes")
    spec = data.spec()
    assert set(spec.task[data.sample_prompts(rng, 200, "colour,two")]) == {1, 3}
    ev = evaluate.eval_set(30, (2, 2, 1), tasks="single,colour,two")
    assert np.bincount(spec.task[ev.prompt_ids], minlength=6).tolist() == [10, 10, 0, 10, 0, 0]
    # the default is every task, as before the selection existed
    a, b = evaluate.eval_set(12, (2, 2, 1)), evaluate.eval_set(12, (2, 2, 1), tasks="")
    assert np.array_equal(a.prompt_ids, b.prompt_ids) and set(spec.task[a.prompt_ids]) == set(range(6))
    assert (evaluate.reference_scenes(50, tasks="single").cells >= 0).sum(1).max() == 1


def test_scenes_use_their_split(rng):
    cells, colours = np.array([[3, -1, -1, -1]]), np.array([[0, -1, -1, -1]])  # a red 3, top left
    for split in digits_data.SPLITS:
        images, labels = digits_data.single_digits(split)
        threes = images[labels == 3] / 16.0
        crop = digits_data.to_unit(data.render(rng, cells, colours, split))[0, :12, :12, 0]  # red = the ink
        offsets = [(y, x) for y in range(1, 4) for x in range(1, 4)]
        assert any(np.abs(crop[y : y + 8, x : x + 8] - t).max() < 1e-5 for y, x in offsets for t in threes), split


def test_vae_trains_saves_and_sets_latent_factors(tmp_path):
    from flowsteer_jax.models.loading import load_vae

    folder = str(tmp_path / "vae")
    model = vae.train_vae(folder, steps=3, batch_size=4, train_scenes=64, progress=False)
    assert vae.is_complete(folder)
    meta = vae.vae_meta(folder)
    assert meta["steps"] == 3 and meta["final_mse"] > 0
    loaded = load_vae(folder)
    assert loaded.config.scaling_factor == model.config.scaling_factor != 1.0
    assert loaded.config.shift_factor == model.config.shift_factor != 0.0
    scenes = data.sample_scenes(np.random.default_rng(0), 64, "train")
    z = vae.encode_latents(loaded, scenes.images)
    assert z.shape == (64, *vae.LATENT_SHAPE)
    # the factors standardise the training latents, as SD3's do
    assert abs(z.mean()) < 0.2 and abs(z.std() - 1) < 0.2
    images = vae.decode(loaded, z[:5])
    assert images.shape == (5, 24, 24, 3) and images.min() >= 0 and images.max() <= 1
    assert vae.ensure_vae(folder) is not None  # reused, not retrained


def test_classifier_on_held_out_scenes():
    acc = evaluate.classifier_accuracy(300)
    assert acc["digit"] > 0.9 and acc["colour"] > 0.95 and acc["scene"] > 0.7, acc
    real = evaluate.reference_scenes(300, seed=7)
    m = evaluate.evaluate(digits_data.to_unit(real.images), real.prompt_ids, digits_data.to_unit(real.images))
    assert m["accuracy"] > 0.7 and m["count"] > 0.95 and m["mse_to_reference"] == 0
    noise = np.random.default_rng(0).uniform(size=real.images.shape)
    assert evaluate.evaluate(noise, real.prompt_ids)["fd"] > 10 * m["fd"]


def test_compose_run_end_to_end(tmp_path, capsys):
    """The trainer in the world, shortened: VAE, teacher, a few FlowSteer steps, report; then the ablation runner
    in the world (Table 1 and a Table 5 row), sharing the run's VAE and teacher; the evaluate command on the run."""
    from configs.digits_compose import get_config
    from flowsteer_jax import evaluate as evaluate_command
    from flowsteer_jax.digits import ablate
    from flowsteer_jax.train import train

    config = get_config()
    config.compose.update(vae_train_steps=3, teacher_train_steps=3, teacher_layers=2, pool_size=64, eval_samples=12)
    config.train.update(num_steps=2, batch_size=4)
    config.checkpoint.every_steps = 2
    workdir = str(tmp_path / "compose")
    out = train(config, workdir)
    assert out["step"] == 2 and not out["stopped"]
    # The world's own config section defines the run: resuming with another compose.* setting is refused.
    changed = config.copy_and_resolve_references()
    changed.compose.pool_size = 65
    with pytest.raises(CheckpointError, match=r"compose\.pool_size: 64 -> 65"):
        train(changed, workdir)
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    assert set(metrics["rows"]) == {
        "teacher_28_diffusers",
        "teacher_4_diffusers",
        "teacher_4_rectified",
        "teacher_4_rectified_nocfg",
        "student_4",
    }
    for name in metrics["rows"]:
        with np.load(os.path.join(workdir, "samples", f"{name}.npz")) as f:
            assert f["images"].shape == (12, 24, 24, 3)
    assert metrics["classifier_held_out"]["digit"] > 0.9
    assert "FlowSteer student, 4 steps, no CFG" in open(os.path.join(workdir, "report.md")).read()
    capsys.readouterr()
    assert evaluate_command.main(["--digits", workdir, "--out", str(tmp_path / "eval")]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    student = metrics["rows"]["student_4"]
    assert last["accuracy"] == student["accuracy"] and last["fd"] == student["fd"]
    assert "| colour |" in open(tmp_path / "eval" / "results.md").read()
    from flowsteer_jax.digits import figure

    assert figure.main(["--run", workdir, "--out", str(tmp_path / "fig.png"), "--n=5", "--scale=1"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "fig.png").size == (5 * 24 + 6 * 2, 4 * 24 + 5 * 2)  # 4 rows, 2-pixel borders
    assert figure.main(["--run", workdir, "--out", str(tmp_path / "f.png"), "--rows=nope"]) == 2

    sets = ["--set=compose.eval_samples=12", "--set=compose.pool_size=64", "--set=train.batch_size=4"]
    args = ["--workdir", workdir, "--config=configs/digits_compose.py", "--seeds=1", "--steps=1", "--tables=1"]
    assert ablate.main([*args, "--rows=perflow", *sets]) == 0
    result = json.load(open(os.path.join(workdir, "ablation.json")))
    kinds, ts = ("interpolated", "coupled", "uncoupled"), ("0.900", "0.750", "0.500")
    assert set(result["table1"]) == {"trajectory"} | {f"{k}_{t}" for k in kinds for t in ts}
    # per-image pairs with the own trajectory (same prompts and noises): the gate's statistics
    assert result["table1"]["coupled_0.500"][0]["paired_n"] == 12
    assert result["table1"]["interpolated_0.500"][0]["count"] >= 0 and set(result["rows"]) == {"perflow"}
    assert result["rows"]["perflow"][0]["step"] == 1
    table = open(os.path.join(workdir, "ablation.md")).read()
    assert "digits_compose world" in table and "| colour ↑ |" in table and "| PeRFlow |" in table
    with np.load(os.path.join(workdir, "samples", "table1_interpolated_0.750_seed0.npz")) as f:
        assert f["images"].shape == (12, 24, 24, 3)
    per_seed = json.load(open(os.path.join(workdir, "digits_compose_ablation.json")))
    assert per_seed["PeRFlow"]["accuracy"] == [result["rows"]["perflow"][0]["accuracy"]]
    assert len(per_seed["PeRFlow"]["mse_teacher"]) == 1
    # With the gate on, a 3-step teacher fails it: the ablation refuses to train and says why (exit 2)
    gated = [*args[:-1], "--tables=5", "--rows=ota", *sets, "--set=compose.gate=True"]
    assert ablate.main(gated) == 2
    assert "gate failed" in capsys.readouterr().err
    assert "## The teacher-only gate: FAILED" in open(os.path.join(workdir, "ablation.md")).read()
    assert not os.path.exists(os.path.join(workdir, "ablation", "ota_seed0"))


def test_caption_corruption_rates_and_kinds(rng):
    """LAION-like captions: the stated fraction changes, into another prompt of the world of the drawn kind, and
    every kind a task admits occurs; the pool's images stay as they are."""
    from flowsteer_jax.compose import world

    ids = data.sample_prompts(rng, 20_000, "single,colour,two")
    new, kinds = data.corrupt_captions(np.random.default_rng(1), ids, 0.3)
    changed = new != ids
    assert np.array_equal(changed, kinds >= 0)
    assert abs(changed.mean() - 0.3) < 0.015  # binomial sd 0.003; every prompt of these tasks admits a kind
    assert set(np.unique(kinds[changed])) == {0, 1, 2}
    s, prompts = data.spec(), data.all_prompts()
    for i in np.flatnonzero(changed)[:300]:
        a, b, kind = ids[i], new[i], data.CORRUPTIONS[kinds[i]]
        if kind == "attribute":  # same digits, another colour
            assert sorted(s.digit[a]) == sorted(s.digit[b]) and sorted(s.colour[a]) != sorted(s.colour[b])
        elif kind == "partial":  # fewer objects named, or the colour left out
            assert s.count[b] < s.count[a] or (s.count[b] == 1 and s.colour[b][0] < 0 <= s.colour[a][0])
        else:
            assert sorted(s.digit[a]) != sorted(s.digit[b]), (prompts[a], prompts[b])
    same, _ = data.corrupt_captions(np.random.default_rng(1), ids, 0.0)
    assert np.array_equal(same, ids)
    # the world's pool: captions corrupted at the config's rate, the scenes those of the clean pool
    from configs.digits_compose import get_config

    config = get_config()
    config.compose.pool_size = 2000
    clean = world.training_pool(config)
    config.compose.caption_noise = 0.3
    noisy = world.training_pool(config)
    assert np.array_equal(noisy.images, clean.images) and np.array_equal(noisy.cells, clean.cells)
    assert abs((noisy.prompt_ids != clean.prompt_ids).mean() - 0.3) < 0.04
    # PeRFlow's x0 for a prompt is a pool scene captioned with it (so wrong 30% of the time)
    latents = np.arange(len(noisy.prompt_ids), dtype=np.float32)
    want = noisy.prompt_ids[:50]
    picked = world.pool_x0(noisy, latents, want, seed=0).astype(np.int64)
    assert np.array_equal(noisy.prompt_ids[picked], want)
