"""`python -m flowsteer_jax.evaluate` end to end on the tiny random SD3 folder with tiny random CLIP-L, PickScore,
HPSv2 (open_clip) and Inception weight files written here: the table, the JSON and its provenance, the last stdout
line, rows kept across runs, `--images`, LoRA rows, fixed noise, FID against pytorch-fid, and bad input."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os

import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file

from conversion.lora import to_peft
from conversion.torch_files import sha256
from flowsteer_jax import evaluate
from flowsteer_jax.evaluation.clip_scores import CLIP_FOLDER, PICKSCORE_FOLDER
from flowsteer_jax.evaluation.fid import WEIGHT_NAME as INCEPTION_WEIGHTS
from flowsteer_jax.evaluation.fid import image_files
from flowsteer_jax.evaluation.hps import WEIGHT_NAMES as HPS_WEIGHTS
from flowsteer_jax.evaluation.hps import HPSScorer
from flowsteer_jax.models.loading import load_transformer
from flowsteer_jax.models.lora import LoRALinear, apply_lora
from flowsteer_jax.tools.tiny_pipeline import clip_tokenizer, write_tiny_pipeline
from tests.eval_weights import patch_download, save_hps, save_processor, tiny_clip, write_inception

PROMPTS = ["a red cat", "a blue dog", "two green birds", "a cube on a sphere", "an astronaut", "a small house"]
HPS_TINY = {  # open_clip config of the in-code tokenizer's vocabulary (BOS, EOT = its last two ids)
    "embed_dim": 24,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": len(clip_tokenizer()), "width": 32, "heads": 4, "layers": 2},
}
ALL = {"pickscore", "hps", "clip_score", "fid", "kid"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    weights = root / "weights"
    tiny_clip(0).save_pretrained(weights / CLIP_FOLDER)
    save_processor(weights / CLIP_FOLDER)
    tiny_clip(1).save_pretrained(weights / PICKSCORE_FOLDER)
    save_processor(weights / PICKSCORE_FOLDER)
    save_hps(str(weights), HPS_WEIGHTS[0], HPS_TINY, seed=2)
    (weights / HPS_WEIGHTS[0].replace(".pt", ".json")).write_text(json.dumps(HPS_TINY))
    write_inception(str(weights))
    ref = root / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    sd3 = str(root / "sd3")
    write_tiny_pipeline(sd3, with_t5=False)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {"root": root, "weights": str(weights), "ref": str(ref), "sd3": sd3, "prompts": str(prompts)}


def run(argv: list[str], capsys) -> tuple[int, list[str], str]:
    try:
        rc = evaluate.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out.strip().splitlines(), err


def sampled(world, out: str, *extra) -> list:
    return ["--model", world["sd3"], "--no_t5", "--prompts", world["prompts"], "--steps=2", "--dtype=float32",
            "--weights", world["weights"], "--out", out, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def first_run(world, tmp_path_factory):
    """Every metric (the default: all the weights folder allows, FID/KID with --ref), 6 prompts in batches of 4."""
    out = str(tmp_path_factory.mktemp("eval_out"))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = evaluate.main(sampled(world, out, "--batch=4", "--ref", world["ref"], "--labels=tiny"))
    assert rc == 0, stderr.getvalue()[-3000:]
    return out, stdout.getvalue().strip().splitlines()


def test_table_json_and_provenance(world, first_run):
    out, lines = first_run
    last = json.loads(lines[-1])
    assert set(last) == ALL and all(np.isfinite(v) for v in last.values())
    table = open(os.path.join(out, "results.md")).read()
    assert "| method | NFE | PickScore | HPSv2.1 | CLIP | FID | KID x10^3 |" in table
    assert "| tiny | 2x1 |" in table
    row = json.load(open(os.path.join(out, "results.json")))["rows"][0]
    assert row["label"] == "tiny" and row["metrics"]["kid_std"] >= 0
    assert {k: row["metrics"][k] for k in ALL} == last
    prov = row["provenance"]
    assert prov["prompts"] == {"file": world["prompts"], "sha256": sha256(world["prompts"]), "count": len(PROMPTS)}
    hps = prov["scorers"]["hps"]
    assert prov["hps_version"] == hps["version"] == "v2.1" and hps["source"] == HPS_WEIGHTS[0]
    assert hps["source_sha256"] == sha256(os.path.join(world["weights"], HPS_WEIGHTS[0]))
    assert prov["scorers"]["inception"]["source_sha256"] == sha256(os.path.join(world["weights"], INCEPTION_WEIGHTS))
    assert prov["ref"]["images"] == 8
    assert prov["sampling"]["seed"] == 0 and prov["sampling"]["steps"] == 2 and prov["sampling"]["height"] == 32
    assert prov["transformer_fingerprint"]
    json.dumps(row)


def test_scores_are_per_prompt_and_on_the_papers_scale(world, first_run):
    """Image k was sampled for and scored against prompt k; `hps` is 100 x the mean HPSv2 cosine."""
    out, lines = first_run
    files = image_files(os.path.join(out, "tiny"))
    assert [os.path.basename(f) for f in files] == [f"{i:05d}.png" for i in range(len(PROMPTS))]
    with open(os.path.join(out, "tiny", "scores.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == PROMPTS
    images = [Image.open(f).convert("RGB") for f in files]
    tokenizer = clip_tokenizer()
    hps = HPSScorer.from_weights(world["weights"], tokenizer)(images, PROMPTS)
    last = json.loads(lines[-1])
    assert last["hps"] == pytest.approx(100 * hps.mean(), rel=1e-6)
    np.testing.assert_allclose([float(r["hps"]) for r in rows], 100 * hps, rtol=1e-5)


def test_images_rows_and_rows_kept_across_runs(world, first_run, capsys):
    """`--images` on the sampled folder (its prompts.txt) gives the sampled row's numbers; both rows stay."""
    out, lines = first_run
    rc, got, err = run(["--images", os.path.join(out, "tiny"), "--labels=again", "--weights", world["weights"],
                        "--metrics=pickscore,hps,clip,kid", "--ref", world["ref"], "--out", out], capsys)  # fmt: skip
    assert rc == 0, err
    again, first = json.loads(got[-1]), json.loads(lines[-1])
    assert set(again) == ALL - {"fid"}  # FID's 2048-d matrix root is slow on CPU: once per test file is enough
    for key in again:
        assert again[key] == pytest.approx(first[key], rel=1e-9, abs=1e-12), key
    rows = json.load(open(os.path.join(out, "results.json")))["rows"]
    assert [r["label"] for r in rows] == ["tiny", "again"] and rows[1]["nfe"] == "—"
    assert "| again | — |" in open(os.path.join(out, "results.md")).read()


def lora_file(sd3: str, path: str) -> str:
    """A random PEFT LoRA for the tiny transformer (B nonzero: it changes the samples)."""
    model = load_transformer(os.path.join(sd3, "transformer"))
    apply_lora(model, rank=2, alpha=2.0, rngs=nnx.Rngs(3))
    flat, rng = {}, np.random.default_rng(4)
    for p, layer in nnx.iter_modules(model):
        if isinstance(layer, LoRALinear):
            name = ".".join(map(str, p))
            flat[f"{name}.lora_a"] = np.asarray(layer.lora_a[...])
            flat[f"{name}.lora_b"] = rng.normal(0, 0.5, layer.lora_b[...].shape).astype(np.float32)
    save_file(to_peft(flat, 1.0, model.config.to_diffusers()), path)
    return path


def test_noise_is_per_image_and_lora_rows(world, first_run, tmp_path, capsys):
    """Batch 3 instead of 4 gives the same images (image i's noise is (seed, i)); a LoRA row differs from the base,
    and the base row sampled after it (adapters removed) equals the base again."""
    out, _ = first_run
    lora = lora_file(world["sd3"], str(tmp_path / "student.safetensors"))
    new = str(tmp_path / "rows")
    argv = sampled(world, new, "--batch=3", "--metrics=clip", "--lora", lora, "--lora=none", "--labels=student,base")
    rc, lines, err = run(argv, capsys)
    assert rc == 0, err
    assert set(json.loads(lines[-1])) == {"clip_score"}

    def pixels(folder: str) -> np.ndarray:
        return np.stack([np.asarray(Image.open(f), np.int16) for f in image_files(folder)])

    tiny, base, student = pixels(os.path.join(out, "tiny")), pixels(f"{new}/base"), pixels(f"{new}/student")
    assert np.abs(base - tiny).max() <= 1  # other batch shapes may round a value differently
    assert np.abs(student - tiny).mean() > 5
    rows = json.load(open(os.path.join(new, "results.json")))["rows"]
    assert rows[0]["provenance"]["lora_sha256"] == sha256(lora) and "lora_sha256" not in rows[1]["provenance"]
    # Rerun: the images are reused (same settings), not sampled again.
    before = os.path.getmtime(f"{new}/base/00000.png")
    rc, _, err = run(sampled(world, new, "--batch=3", "--metrics=clip", "--labels=base"), capsys)
    assert rc == 0 and "reusing the 6 images" in err and os.path.getmtime(f"{new}/base/00000.png") == before
    # --lora_scale is part of a row's key: the student row at scale 0 is refused naming it, then with --resample
    # sampled again, and is the base
    scale0 = sampled(world, new, "--batch=3", "--metrics=clip", "--lora", lora, "--lora_scale=0", "--labels=student")
    rc, _, err = run(scale0, capsys)
    assert rc == 2 and "lora_scale: 1.0 -> 0.0" in err, err
    rc, _, err = run([*scale0, "--resample"], capsys)
    assert rc == 0 and "reusing" not in err, err
    assert np.abs(pixels(f"{new}/student") - base).max() <= 1


def test_rows_are_keyed_on_what_made_their_images(world, tmp_path, capsys):
    """A row's images are reused only for the same contents (LoRA, prompt texts, model, settings), wherever the
    files lie; other contents are refused naming what changed, and rows of one name with other contents both stay."""
    import shutil

    out, lora = str(tmp_path / "rows"), str(tmp_path / "a" / "student.safetensors")
    os.makedirs(os.path.dirname(lora))
    lora_file(world["sd3"], lora)
    first = sampled(world, out, "--limit=2", "--metrics=clip", "--lora", lora)
    assert run(first, capsys)[0] == 0
    before = os.path.getmtime(f"{out}/student.safetensors/00000.png")

    def refused(argv: list, changed: str) -> None:
        rc, _, err = run(argv, capsys)
        line = err.strip().splitlines()[-1]  # after the scorers' loading line
        assert rc == 2 and line.startswith("flowsteer_jax.evaluate: error: ") and changed in line, err
        assert "--resample replaces them" in line and "Traceback" not in err, err
        assert os.path.getmtime(f"{out}/student.safetensors/00000.png") == before

    refused([*first, "--steps=3"], "steps: 2 -> 3")  # before: sampled over the row's images
    other_vae = shutil.copytree(world["sd3"], tmp_path / "sd3_other_vae")
    vae_file = next((other_vae / "vae").glob("*.safetensors"))
    tensors = load_file(vae_file)
    name = sorted(tensors)[0]
    save_file({**tensors, name: tensors[name] * np.float32(2)}, vae_file)
    refused([first[0], other_vae, *first[2:]], "model.vae content")
    tensors = load_file(lora)  # trained further: other adapters in the same file
    name = sorted(tensors)[0]
    save_file({**tensors, name: tensors[name] + np.float32(0.5)}, lora)
    refused(first, "lora content")
    other = tmp_path / "other.txt"  # the same number of prompts, other texts
    other.write_text("a green cat\na red dog\n")
    refused(sampled(world, out, "--limit=2", "--metrics=clip", "--lora", lora, "--prompts", other), "prompts.sha256")
    # --resample: the new contents' row joins the old one (same name, other key); both are in the table.
    assert run([*first, "--resample"], capsys)[0] == 0
    rows = json.load(open(os.path.join(out, "results.json")))["rows"]
    assert [r["label"] for r in rows] == ["student.safetensors"] * 2 and rows[0]["key"] != rows[1]["key"]
    table = open(os.path.join(out, "results.md")).read()
    assert all(f"| student.safetensors [{r['key'][:8]}] |" in table for r in rows)
    # The same LoRA and prompts at other paths are the same row: its images are reused, its row replaced.
    moved = shutil.copy(lora, tmp_path / "student.safetensors")
    prompts = shutil.copy(world["prompts"], tmp_path / "prompts.txt")
    argv = sampled(world, out, "--limit=2", "--metrics=clip", "--lora", moved)
    rc, _, err = run([*argv[:4], prompts, *argv[5:]], capsys)
    assert rc == 0 and "reusing the 2 images" in err, err
    assert len(json.load(open(os.path.join(out, "results.json")))["rows"]) == 2


def test_report_rows_are_replaced_by_key_and_never_dropped_by_name(tmp_path):
    """A row replaces the row of its key only; a keyless row (an older results.json, a toy world's) is replaced by
    a keyless row of its name, never by a keyed one."""
    row = lambda label, **kw: {"label": label, "metrics": {"clip_score": 1.0}, "provenance": {}, **kw}  # noqa: E731
    out = str(tmp_path)
    evaluate.write_report(out, [row("old")])
    evaluate.write_report(out, [row("old", key="a" * 16), row("b", key="b" * 16)])
    rows = evaluate.write_report(out, [row("renamed", key="b" * 16)])
    assert [(r["label"], r.get("key")) for r in rows] == [("old", None), ("old", "a" * 16), ("renamed", "b" * 16)]
    assert "| old [aaaaaaaa] |" in open(os.path.join(out, "results.md")).read()
    assert [r["label"] for r in evaluate.write_report(out, [row("old")])] == ["old", "renamed", "old"]


def test_a_sample_folder_is_scored_without_its_grid(world, first_run, tmp_path, capsys):
    """`flowsteer_jax.sample --out=DIR` writes the images, grid.png and prompts.txt: `--images=DIR` scores the
    images against the prompts (the grid is not an image of a prompt)."""
    import shutil

    out, _ = first_run
    folder = tmp_path / "samples"
    shutil.copytree(os.path.join(out, "tiny"), folder)
    Image.new("RGB", (96, 64)).save(folder / "grid.png")
    rc, lines, err = run(["--images", folder, "--metrics=clip", "--weights", world["weights"], "--out",
                          tmp_path / "out"], capsys)  # fmt: skip
    assert rc == 0 and f"not scoring {folder / 'grid.png'} (flowsteer_jax.sample's grid of the images)" in err, err
    rows = json.load(open(tmp_path / "out" / "results.json"))["rows"]
    assert rows[0]["provenance"]["images"]["count"] == len(PROMPTS)


def test_fid_of_folders_equals_pytorch_fid(world, tmp_path, monkeypatch, capsys):
    """The command's FID of two image folders equals pytorch-fid's `calculate_fid_given_paths` on the same random
    Inception weights (and pool3 features to 1e-5)."""
    from pytorch_fid import fid_score

    rng = np.random.default_rng(1)
    for name, shift in (("a", 0), ("b", 40)):
        (tmp_path / name).mkdir()
        for i in range(12):
            base = rng.integers(0, 200, (1, 1, 3)) + shift
            img = np.clip(base + rng.integers(-40, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / name / f"{i:03d}.png")
    patch_download(world["weights"], monkeypatch)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    paths = [str(tmp_path / "a"), str(tmp_path / "b")]
    want = fid_score.calculate_fid_given_paths(paths, batch_size=6, device="cpu", dims=2048, num_workers=0)
    rc, lines, err = run(["--images", paths[0], "--ref", paths[1], "--metrics=fid", "--weights", world["weights"],
                          "--out", tmp_path / "out"], capsys)  # fmt: skip
    assert rc == 0, err
    got = json.loads(lines[-1])["fid"]
    print(f"FID: ours {got:.10g}, pytorch-fid {want:.10g}, relative {abs(got - want) / want:.2e}")
    assert want > 1.0 and abs(got - want) <= 1e-4 * want


def test_digits_run_through_the_same_command(tmp_path, capsys):
    rc, _, err = run(["--digits", tmp_path, "--out", tmp_path / "out"], capsys)
    assert rc == 2 and "no config.json" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--metrics=hps", "--weights", "{empty}"], "HPSv2 weights"),
        (["--metrics=fid"], "need --ref"),
        (["--metrics=bogus"], "unknown ['bogus']"),
        ([], "give --model"),
    ],
)
def test_bad_input_is_one_line(world, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{empty}", str(tmp_path / "empty")) for a in argv]
    if argv:
        argv = ["--images", world["ref"], "--weights", world["weights"], *argv]
        if "--weights" in argv[4:]:
            argv = argv[:2] + argv[4:]  # the test's own --weights wins
    rc, _, err = run([*argv, "--out", tmp_path / "out"], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_image_prompt_count_mismatch_is_named(world, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    rc, _, err = run(["--images", world["ref"], "--prompts", prompts, "--metrics=clip", "--weights", world["weights"],
                      "--out", tmp_path / "out"], capsys)  # fmt: skip
    assert rc == 2 and "8 images but 2 prompts" in err
