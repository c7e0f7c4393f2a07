"""`checkpoint`: what makes a saved run incompatible with this one (the resume refusal's message).

The save/resume behaviour itself is tested end to end in `test_train.py` (kill -9, SIGTERM, changed config).
"""

from __future__ import annotations

from flowsteer_jax.checkpoint import compatibility_problems


def test_compatibility_problems_name_each_change():
    meta = {
        "model_path": "/a",
        "transformer_config": {"num_layers": 2, "_diffusers_version": "0.42.1"},
        "latent_shape": [16, 16, 16],
        "config": {"lora": {"rank": 4, "targets": ["to_q"]}},
        "shapes": {"x": [1, 2]},
    }
    assert compatibility_problems(meta, meta) == []
    # Bookkeeping keys of config.json ("_diffusers_version", "_name_or_path") are not the model.
    assert compatibility_problems(meta, {**meta, "transformer_config": {"num_layers": 2}}) == []
    other = {
        "model_path": "/b",
        "transformer_config": {"num_layers": 3},
        "latent_shape": [8, 8, 16],
        "config": {"lora": {"rank": 4, "targets": ["to_q", "to_k"]}},
        "shapes": {"x": [1, 3]},
    }
    problems = "\n".join(compatibility_problems(meta, other))
    for text in ("base model: checkpoint used '/a', this run '/b'", "latent_shape", "lora.targets", "shapes differ"):
        assert text in problems


def _meta(**changes):
    """A current-format meta (base_fingerprint, components, prompts and run settings) of the default config,
    with `changes` to the config given as dotted keys."""
    import json

    from flowsteer_jax.checkpoint import run_settings
    from flowsteer_jax.distill.config import default_config

    config = json.loads(default_config().to_json_best_effort())
    for key, value in changes.items():
        *path, last = key.split(".")
        section = config
        for part in path:
            section = section[part]
        section[last] = value
    return {
        "model_path": "/a",
        "transformer_config": {"num_layers": 2},
        "base_fingerprint": "0123456789abcdef",
        "components": {"text_encoder": "1111111111111111", "text_encoder_3": "3333333333333333"},
        "prompts": {"count": 8, "sha256": "ab" * 32},
        "latent_shape": [16, 16, 16],
        "config": config,
        "run": run_settings(config),
        "shapes": {"x": [1, 2]},
    }


def test_changed_run_settings_are_refused_all_in_one_list():
    from flowsteer_jax.checkpoint import resume_report

    saved = _meta()
    assert resume_report(saved, saved) == ([], [])
    now = _meta(**{"optim.lora.lr": 5e-4, "seed": 7, "distill.cfg_max": 9.0, "data.shuffle": False})
    problems, notes = resume_report(saved, now)
    assert problems == [
        "data.shuffle: True -> False",
        "distill.cfg_max: 13.0 -> 9.0",
        "optim.lora.lr: 0.0001 -> 0.0005",
        "seed: 0 -> 7",
    ]
    assert notes == []


def test_bookkeeping_settings_may_change():
    from flowsteer_jax.checkpoint import compatibility_problems

    now = _meta(
        **{
            "train.num_steps": 99_999,
            "train.log_every": 1,
            "checkpoint.every_steps": 7,
            "checkpoint.keep": 1,
            "eval.every_steps": 3,
            "data.cache_embeddings": True,
            "model.path": "/elsewhere",
            "mesh.shape": [1, 2, 1],
        }
    )
    assert compatibility_problems(_meta(), now) == []


def test_allowed_changes_are_notes_by_key_or_prefix():
    from flowsteer_jax.checkpoint import resume_report

    saved, now = _meta(), _meta(**{"optim.lora.lr": 5e-4, "optim.disc.b2": 0.99, "loss.lambda_fm": 2.0})
    problems, notes = resume_report(saved, now, allow=("optim.lora.lr", "loss"))
    assert problems == ["optim.disc.b2: 0.999 -> 0.99"]
    assert notes == [
        "allowed change (checkpoint.allow_changes): loss.lambda_fm: 1.0 -> 2.0",
        "allowed change (checkpoint.allow_changes): optim.lora.lr: 0.0001 -> 0.0005",
    ]
    assert resume_report(saved, now, allow=("optim", "loss"))[0] == []
    # A prefix matches whole key parts only, and structural keys are never allowed (the shapes would differ).
    assert resume_report(saved, now, allow=("optim.lo", "loss", "optim.disc"))[0] == ["optim.lora.lr: 0.0001 -> 0.0005"]
    problems, _ = resume_report(saved, {**_meta(**{"lora.rank": 8})}, allow=("lora",))
    assert problems == ["lora.rank: 64 -> 8"]


def test_other_base_weights_are_refused_a_moved_base_is_not():
    from flowsteer_jax.checkpoint import resume_report

    saved = _meta()
    problems, _ = resume_report(saved, {**saved, "base_fingerprint": "fedcba9876543210"})
    assert len(problems) == 1 and problems[0].startswith("base weights: checkpoint used '/a' (base_fingerprint 0123")
    assert "same config.json with other weights" in problems[0]
    problems, notes = resume_report(saved, {**saved, "base_fingerprint": "f" * 16}, allow=("base_fingerprint",))
    assert problems == [] and notes[0].startswith("allowed change (checkpoint.allow_changes): base weights")
    problems, notes = resume_report(saved, {**saved, "model_path": "/moved"})
    assert problems == [] and notes == [
        "base model moved: '/a' -> '/moved' (same weights, base_fingerprint 0123456789abcdef)"
    ]


def test_a_checkpoint_from_before_the_checks_resumes_with_one_note():
    from flowsteer_jax.checkpoint import resume_report

    old = {k: v for k, v in _meta().items() if k not in ("base_fingerprint", "run")}
    now = _meta(**{"optim.lora.lr": 5e-4})
    problems, notes = resume_report(old, {**now, "base_fingerprint": "f" * 16})
    assert problems == []
    assert len(notes) == 1 and "cannot be checked" in notes[0]
    # The structural checks still apply to it.
    assert resume_report(old, _meta(**{"lora.rank": 8}))[0] == ["lora.rank: 64 -> 8"]


def test_settings_added_later_default_to_the_old_behaviour():
    """A checkpoint written before `loss.gan`, `disc.heads`, `disc.trunk` existed resumes with their defaults
    (what it was trained with), and is refused when the run asks for something else."""
    from flowsteer_jax.checkpoint import ADDED_KEYS, resume_report, run_settings

    now = _meta()
    old = _meta()
    for key in ADDED_KEYS:
        section, leaf = key.split(".")
        del old["config"][section][leaf]
    old["run"] = run_settings(old["config"])
    assert not set(ADDED_KEYS) & set(old["run"])
    assert resume_report(old, now) == ([], [])
    problems, _ = resume_report(old, _meta(**{"disc.trunk": "frozen", "loss.gan": "least_squares"}))
    assert "disc.trunk: None -> 'frozen'" in problems and "loss.gan: 'hinge' -> 'least_squares'" in problems


def test_ema_round_trips_and_cannot_be_switched_on_over_a_checkpoint_without_it(tmp_path):
    """The EMA tree is saved and restored with the state; an older checkpoint (no `ema` keys) resumes with it off,
    and a run that turns it on over such a checkpoint is refused naming the setting."""
    import jax
    import numpy as np

    from flowsteer_jax.checkpoint import Checkpointer, resume_report, run_settings
    from tests.test_distill import single_device_state, tiny_config

    config = tiny_config(**{"loss.lambda_adv": 0.0, "loss.lambda_fm": 0.0, "ema.decay": 0.9})
    state, _, _ = single_device_state(config)
    state["ema"] = jax.tree.map(lambda x: x + 1.0, state["ema"])
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, state, _meta(**{"ema.decay": 0.9}))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    expect = _meta(**{"ema.decay": 0.9})
    expect["shapes"] = None  # restore fills in the state's own
    restored, meta = ckpt.restore(abstract, {k: v for k, v in expect.items() if k != "shapes"})
    ckpt.close()
    assert meta["step"] == 3
    for a, b in zip(jax.tree.leaves(restored["ema"]), jax.tree.leaves(state["ema"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    old = _meta()
    del old["config"]["ema"]
    old["run"] = run_settings(old["config"])
    assert resume_report(old, _meta()) == ([], [])
    problems, _ = resume_report(old, _meta(**{"ema.decay": 0.9}))
    assert "ema.decay: 0.0 -> 0.9" in problems


def test_other_text_encoders_or_prompt_texts_are_refused_by_content():
    """The models besides the base and the prompt texts are compared by content: a pipeline without T5, another
    CLIP, or a prompt file edited in place (same path) are refused; `allow_changes` may name them."""
    from flowsteer_jax.checkpoint import resume_report

    saved = _meta()
    no_t5 = {**saved, "components": {**saved["components"], "text_encoder_3": None}}
    problems, _ = resume_report(saved, no_t5)
    assert problems == ["components.text_encoder_3: fingerprint 3333333333333333 -> None (None: no such component)"]
    other = {**saved, "components": {**saved["components"], "text_encoder": "2" * 16}}
    assert resume_report(saved, other)[0] == [
        "components.text_encoder: fingerprint 1111111111111111 -> 2222222222222222 (None: no such component)"
    ]
    edited = {**saved, "prompts": {"count": 50, "sha256": "cd" * 32}}
    problems, _ = resume_report(saved, edited)
    assert problems == [
        "prompts: checkpoint trained on 8 prompts (sha256 abababababab), this run has 50 (sha256 cdcdcdcdcdcd): "
        "other texts or order"
    ]
    problems, notes = resume_report(saved, {**edited, **no_t5, "prompts": edited["prompts"]}, allow=("prompts",))
    assert len(problems) == 1 and notes[0].startswith("allowed change (checkpoint.allow_changes): prompts:")


def test_the_same_prompts_at_another_path_are_the_same_run():
    """`data.prompts` is a path: not compared (the texts are). A checkpoint that recorded it as a run setting
    (before the texts were hashed) resumes with another path."""
    from flowsteer_jax.checkpoint import resume_report

    saved = _meta(**{"data.prompts": "/a/prompts.txt"})
    saved["run"]["data.prompts"] = "/a/prompts.txt"
    assert resume_report(saved, _meta(**{"data.prompts": "/b/copy.txt"})) == ([], [])


def test_the_worlds_own_section_defines_the_run_but_its_folders():
    """`run_settings` takes the world's declared section (digits_compose: `compose`), less the keys naming
    folders (checked by content). A checkpoint that did not record the section is compared through its config."""
    from flowsteer_jax.checkpoint import resume_report, run_settings

    def meta(**compose):
        m = _meta()
        m["config"]["compose"] = {"pool_size": 64, "text_seed": 0, "teacher_dir": "/a/teacher", **compose}
        m["run"] = run_settings(m["config"], "compose", ("compose.teacher_dir",))
        return m

    assert "compose.pool_size" in meta()["run"] and "compose.teacher_dir" not in meta()["run"]
    assert resume_report(meta(), meta(pool_size=65))[0] == ["compose.pool_size: 64 -> 65"]
    assert resume_report(meta(), meta(teacher_dir="/b/moved")) == ([], [])
    older = meta()
    older["run"] = run_settings(older["config"])  # saved before worlds declared their section
    assert resume_report(older, meta(text_seed=1))[0] == ["compose.text_seed: 0 -> 1"]


def test_a_checkpoint_from_before_the_content_checks_resumes_with_one_note():
    from flowsteer_jax.checkpoint import resume_report

    old = {k: v for k, v in _meta().items() if k not in ("components", "prompts")}
    problems, notes = resume_report(old, _meta())
    assert problems == [] and len(notes) == 1 and "predates content checks" in notes[0]
