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
