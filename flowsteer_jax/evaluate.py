r"""Score a model the way the paper does: PickScore, HPSv2, CLIP score (and FID/KID against real images).

    python -m flowsteer_jax.evaluate --model=SD3_DIR [--lora=RUN_OR_FILE ...] --prompts=FILE --steps=4 \
        --guidance=0 --schedule=rectified --metrics=pickscore,hps,clip,fid,kid --weights=DIR [--ref=IMAGES] \
        --out=DIR
    python -m flowsteer_jax.evaluate --images=DIR [--images=DIR2 ...] [--prompts=FILE] --weights=DIR --out=DIR
    python -m flowsteer_jax.evaluate --digits=RUN_DIR --out=DIR      # the digits world's own metrics

Rows: every `--model` (each `--lora`, `none` = the base, gives a row of its own; any published SD3 LoRA layout,
`--lora_scale` for all of them, each checked before any model loads), or every `--images` folder
(another method's outputs, scored the same way; prompts from `--prompts` or the folder's `prompts.txt`, in file
order). Sampling writes `DIR/<row>/00000.png, ...` with fixed noise: image `i` starts from (`--seed`, `i`) for every
row, so rows compare image for image. Each row's per-image scores go to `DIR/<row>/scores.csv`; `DIR/results.json`
(rows with provenance: weight hashes, preprocessing, resolution, prompt-file hash, seeds) and `DIR/results.md` (a
table like the paper's: method, NFE, metrics) keep the rows of earlier runs into the same `--out`, so a 28-step CFG
teacher and 4-step students run as separate commands end in one table. A row is identified by its key
(`row_key`): a hash of what determines its images (every model component's and the LoRA's content, the prompt
texts in order, seed, steps, guidance, schedule, resolution, dtype), not by its name. A row's images are reused
for the same key; for another one the row is refused naming what changed, unless `--resample`; the row of the
same key is replaced, and rows of one name with other keys both stay (`name [key]` in the table).
An `--images` folder's `grid.png` (`flowsteer_jax.sample`'s) is not scored.
`--out` is new, empty or an earlier evaluate output, never inside a model, a workdir, a checkpoint or an input
(`flowsteer_jax.outputs`); `DIR/evaluate.log` is the log, named by a failure's one line.

`--weights=DIR` holds the upstream files under their upstream names (see README "Evaluation"):
`clip-vit-large-patch14/` and `PickScore_v1/` (transformers folders), `HPS_v2.1_compressed.pt` or
`HPS_v2_compressed.pt` (HPSv2; the CLIP folder's tokenizer serves it), `pt_inception-2015-12-05-6726825d.pth`
(pytorch-fid). A `.pt`/`.pth` is converted once to a `.safetensors` beside it (needs torch that one time); a
`.safetensors` conversion alone is enough. Nothing is ever downloaded. `--metrics` defaults to every metric the
weights folder allows (FID and KID only with `--ref`).

Scales (as the paper's tables): `pickscore` = mean exp(logit_scale) cos, `hps` = 100 x mean cos (HPSv2),
`clip_score` = mean 100 max(cos, 0), `fid`, `kid` (unbiased MMD, polynomial kernel; the table shows KID x 10^3).
The last stdout line is one JSON object with one key per metric of the last row.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import flags

from conversion.errors import InputError
from conversion.lora import PEFT_FILE
from conversion.torch_files import sha256 as sha256_file
from conversion.training_checkpoint import CHECKPOINTS, read_lora, resolve_step
from flowsteer_jax import cli, outputs
from flowsteer_jax.data import prompts_digest
from flowsteer_jax.evaluation.metrics import (
    METRICS,
    TEXT_METRICS,
    Scorers,
    available_metrics,
    folder_features,
    score_files,
    summarize,
)
from flowsteer_jax.images import GRID

PROG = "flowsteer_jax.evaluate"


# --- the report: results.json + results.md, rows accumulated per --out ---


def nfe(steps: int, guidance: float) -> str:
    """The paper's "steps x CFG passes"."""
    return f"{steps}x{2 if guidance > 1 else 1}"


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, Callable[[float], str]]]) -> str:
    """`| method | NFE | <columns> |`; `columns`: (JSON key, header, formatter); a missing or NaN value (a metric
    that does not apply, e.g. position with no position prompts) shows as —."""
    lines = [
        "| method | NFE | " + " | ".join(h for _, h, _ in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    labels = [r["label"] for r in rows]
    for r in rows:
        values = [r["metrics"].get(k) for k, _, _ in columns]
        cells = ["—" if v is None or v != v else fmt(v) for v, (_, _, fmt) in zip(values, columns, strict=True)]
        # Rows of one name with other contents (a LoRA trained further, other prompts) stay apart: by their key.
        label = f"{r['label']} [{r['key'][:8]}]" if labels.count(r["label"]) > 1 and "key" in r else r["label"]
        lines.append(f"| {label} | {r.get('nfe', '—')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sd3_columns(rows: Sequence[dict]) -> list[tuple[str, str, Callable[[float], str]]]:
    present = {k for r in rows for k in r["metrics"]}
    fmts = {"kid": lambda v: f"{1e3 * v:.2f}", "fid": lambda v: f"{v:.2f}"}
    hps_versions = sorted({r["provenance"].get("hps_version") for r in rows} - {None})
    cols = []
    for key, header in METRICS.values():
        if key in present:
            if key == "hps" and hps_versions:
                header = "HPS" + "/".join(hps_versions)
            cols.append((key, header, fmts.get(key, lambda v: f"{v:.2f}")))
    return cols


def write_report(out: str, new_rows: Sequence[dict], *, columns=None, header: str = "") -> list[dict]:
    """Merge `new_rows` into `out/results.json`, write `out/results.md`; all rows back.

    A row with a `key` (what determines its images: `row_key`) replaces only the row of the same key, whatever
    their labels; a row without one (the toy worlds' runs) the row of the same label."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    rows: list[dict] = []
    if os.path.isfile(path):
        try:
            with open(path) as f:
                rows = json.load(f)["rows"]
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{path}: unreadable results of an earlier run ({e}); move it away or pick --out") from e
    keys = {r["key"] for r in new_rows if "key" in r}
    labels = {r["label"] for r in new_rows if "key" not in r}
    rows = [r for r in rows if r.get("key") not in keys and not ("key" not in r and r["label"] in labels)]
    rows += list(new_rows)
    outputs.clean_stale(path)
    tmp = outputs.temp_path(path)
    with open(tmp, "w") as f:
        json.dump({"rows": rows}, f, indent=2)
    os.replace(tmp, path)
    table = markdown_table(rows, columns if columns is not None else _sd3_columns(rows))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write((header + "\n\n" if header else "") + table + "\n")
    return rows


def _write_scores_csv(path: str, files: Sequence[str], prompts: Sequence[str] | None, per_image: dict) -> None:
    keys = [m for m in METRICS if m in per_image]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "prompt", *(METRICS[m][0] for m in keys)])
        for i, p in enumerate(files):
            w.writerow([os.path.basename(p), prompts[i] if prompts else "", *(f"{per_image[m][i]:.6f}" for m in keys)])


# --- flags ---


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_multi_string("model", [], "diffusers SD3 pipeline folder; repeat for several", flag_values=fv)
    flags.DEFINE_multi_string(
        "lora", [], "student LoRA (training workdir, exported folder, .safetensors) or `none`; repeat", flag_values=fv
    )
    flags.DEFINE_float("lora_scale", 1.0, "multiplies every --lora's effect (Hyper-SD3's card: 0.125)", flag_values=fv)
    flags.DEFINE_multi_string("images", [], "score this folder's images instead of sampling; repeat", flag_values=fv)
    flags.DEFINE_string("digits", None, "a toy-world run (digits, digits_compose): its metrics", flag_values=fv)
    flags.DEFINE_list("labels", [], "row names (default: from the lora / model / folder)", flag_values=fv)
    flags.DEFINE_string("prompts", None, "prompt file (.txt, .jsonl, .parquet)", flag_values=fv)
    flags.DEFINE_integer("limit", 0, "use only the first N prompts (0: all)", flag_values=fv)
    flags.DEFINE_list("metrics", [], f"subset of {','.join(METRICS)} (default: what --weights allows)", flag_values=fv)
    flags.DEFINE_string("weights", None, "folder of the metrics' upstream weight files", flag_values=fv)
    flags.DEFINE_string("ref", None, "folder of reference (real) images for FID/KID", flag_values=fv)
    flags.DEFINE_string("out", None, "output folder (images, scores, results.json, results.md)", flag_values=fv)
    flags.DEFINE_integer("steps", 4, "inference steps", flag_values=fv)
    flags.DEFINE_float("guidance", 0.0, "CFG scale (<= 1: no CFG)", flag_values=fv)
    flags.DEFINE_enum("schedule", "rectified", ["rectified", "diffusers"], "sigma schedule", flag_values=fv)
    flags.DEFINE_string("negative_prompt", None, "negative prompt (with CFG)", flag_values=fv)
    flags.DEFINE_integer("batch", 4, "images per sampling call (the last one is padded)", flag_values=fv)
    flags.DEFINE_integer("score_batch", 32, "images per scoring call", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "noise seed: image i starts from (seed, i) in every row", flag_values=fv)
    flags.DEFINE_integer("height", None, "image height (default: the model's)", flag_values=fv)
    flags.DEFINE_integer("width", None, "image width (default: the model's)", flag_values=fv)
    flags.DEFINE_integer("max_sequence_length", 256, "T5 tokens", flag_values=fv)
    flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "sampling compute dtype", flag_values=fv)
    flags.DEFINE_bool("no_t5", False, "sample without the T5 encoder", flag_values=fv)
    flags.DEFINE_bool("resample", False, "sample again even where DIR/<row>/ holds the images", flag_values=fv)


def main(argv: list[str] | None = None) -> int:
    args = cli.parse(define_flags, argv, prog=PROG, doc=__doc__)
    modes = [bool(args.model), bool(args.images), args.digits is not None]
    if sum(modes) != 1:
        cli.fail(PROG, "give --model (sampling), --images (existing images) or --digits (a toy-world run), one kind")
    if args.out is None:
        cli.fail(PROG, "--out is required")
    unknown = [m for m in args.metrics if m not in METRICS]
    if unknown:
        cli.fail(PROG, f"--metrics: unknown {unknown}; choose from {list(METRICS)}")
    if args.lora and not args.model:
        cli.fail(PROG, "--lora needs --model (the base it applies to)")
    return cli.run(PROG, lambda: _main(args))


def _row_specs(args) -> list[dict]:
    """One dict per row: label, and model + lora (sampling) or folder (images)."""
    if args.images:
        specs = [{"folder": f, "label": os.path.basename(os.path.normpath(f))} for f in args.images]
    else:
        specs = []
        for model in args.model:
            for lora in args.lora or ["none"]:
                lora = None if lora == "none" else lora
                name = os.path.basename(os.path.normpath(lora or model))
                specs.append({"model": model, "lora": lora, "label": name})
    if args.labels:
        if len(args.labels) != len(specs):
            raise InputError(f"--labels has {len(args.labels)} names for {len(specs)} rows")
        for s, label in zip(specs, args.labels, strict=True):
            s["label"] = label
    seen = [s["label"] for s in specs]
    dupes = sorted({x for x in seen if seen.count(x) > 1})
    if dupes:
        raise InputError(f"two rows are named {dupes}: name them with --labels")
    return specs


def _prompts(args, folder: str | None) -> tuple[list[str] | None, str | None]:
    """The prompts and the file they came from (`--prompts`, else `folder/prompts.txt` for --images rows)."""
    from flowsteer_jax.data import DataError, load_prompts

    path = args.prompts
    if path is None and folder is not None and os.path.isfile(os.path.join(folder, "prompts.txt")):
        path = os.path.join(folder, "prompts.txt")
    if path is None:
        return None, None
    if not os.path.isfile(path):
        raise InputError(f"--prompts={path}: no such prompt file")
    try:
        prompts = load_prompts(path)
    except DataError as e:
        raise InputError(f"--prompts: {e}") from e
    return (prompts[: args.limit] if args.limit > 0 else prompts), path


@contextlib.contextmanager
def _output(args) -> Iterator[None]:
    """`--out` checked and started (`outputs.prepare_output`: it accumulates rows), logging to `evaluate.log`."""
    inputs = [*args.model, *args.lora, *args.images, args.ref, args.weights, args.digits]
    output = outputs.prepare_output(args.out, PROG, inputs=[p for p in inputs if p != "none"], staged=False)
    with cli.log_to(output.log_file):
        yield


def _main(args) -> int:
    if args.digits is not None:
        return _main_digits(args)
    from flowsteer_jax.models.loading import SD3_COMPONENTS, check_pipeline
    from flowsteer_jax.sample import check_sampling

    if args.weights is not None and not os.path.isdir(args.weights):
        raise InputError(f"--weights={args.weights}: no such folder")
    if args.ref is not None and not os.path.isdir(args.ref):
        raise InputError(f"--ref={args.ref}: no such folder")
    metrics = list(args.metrics) or available_metrics(args.weights, args.ref)
    if not metrics:
        raise InputError(
            "no metric to compute: --weights holds none of the metrics' files (see --help), or give --metrics"
        )
    if args.weights is None:
        raise InputError(f"--metrics={','.join(metrics)} needs --weights=DIR (the upstream weight files)")
    if ("fid" in metrics or "kid" in metrics) and args.ref is None:
        raise InputError("--metrics fid/kid need --ref=IMAGES_DIR (the real images to compare with)")
    if args.score_batch < 1 or args.limit < 0:
        raise InputError(f"--score_batch={args.score_batch} must be >= 1 and --limit={args.limit} >= 0")
    specs = _row_specs(args)
    for spec in specs:  # a bad --lora fails here, before any model loads
        if spec.get("lora") is not None:
            _check_lora(spec)
    models = sorted({s["model"] for s in specs if "model" in s})
    for model in models:  # every sampled model and the sampling flags, before the scorers load
        skip_t5 = ("text_encoder_3", "tokenizer_3") if args.no_t5 else ()
        check_pipeline(model, [n for n in SD3_COMPONENTS if n not in skip_t5], what="--model")
    if models:
        check_sampling(args, models)
    with _output(args):
        return _score_rows(args, metrics, specs)


def _score_rows(args, metrics: list[str], specs: list[dict]) -> int:
    from flowsteer_jax.evaluation.fid import image_files  # imports jax: not at start-up (--help, bad flags)

    t0 = time.perf_counter()
    scorers = Scorers(metrics, args.weights, batch_size=args.score_batch)
    print(f"loaded {', '.join(metrics)} scorers in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    ref_features, ref_info = None, None
    if scorers.inception is not None:
        ref_files = image_files(args.ref)
        ref_features = folder_features(scorers.inception, ref_files)
        ref_info = {"folder": os.path.abspath(args.ref), "images": len(ref_files)}

    rows = []
    pipe = None
    for spec in specs:
        prompts, prompt_file = _prompts(args, spec.get("folder"))
        row_dir = os.path.join(args.out, spec["label"])
        prov: dict[str, Any] = {"scorers": scorers.provenance, "ref": ref_info}
        if "hps" in scorers.text:
            prov["hps_version"] = scorers.text["hps"].provenance.get("version")
        if "folder" in spec:
            files = image_files(spec["folder"])
            grid = [f for f in files if os.path.basename(f) == GRID]
            if grid:
                print(
                    f"{spec['label']}: not scoring {grid[0]} (flowsteer_jax.sample's grid of the images)",
                    file=sys.stderr,
                )
                files.remove(grid[0])
            if prompts is not None and len(prompts) != len(files):
                raise InputError(
                    f"--images={spec['folder']}: {len(files)} images but {len(prompts)} prompts in {prompt_file} "
                    "(image k, in file-name order, is scored against prompt k)"
                )
            prov["images"] = {"folder": os.path.abspath(spec["folder"]), "count": len(files)}
            contents = {"images": [sha256_file(f) for f in files], "prompts": prompts_digest(prompts or [])}
            row = {"label": spec["label"], "nfe": "—", "key": row_key(contents)}
        else:
            if prompts is None:
                raise InputError("sampling needs --prompts=FILE")
            pipe, files, sample_prov, key = _sample_row(args, spec, prompts, row_dir, pipe)
            prov.update(sample_prov)
            row = {"label": spec["label"], "nfe": nfe(args.steps, args.guidance), "key": key}
        if any(m in TEXT_METRICS for m in metrics) and prompts is None:
            raise InputError(f"{', '.join(m for m in metrics if m in TEXT_METRICS)} need prompts: give --prompts")
        if prompt_file is not None:
            prov["prompts"] = {"file": os.path.abspath(prompt_file), "sha256": sha256_file(prompt_file)}
            prov["prompts"]["count"] = len(prompts)
        per_image = score_files(files, prompts, scorers, desc=f"scoring {spec['label']}")
        row["metrics"] = summarize(per_image, ref_features, metrics)
        row["provenance"] = prov
        os.makedirs(row_dir, exist_ok=True)
        _write_scores_csv(os.path.join(row_dir, "scores.csv"), files, prompts, per_image)
        rows.append(row)
        all_rows = write_report(args.out, [row])  # after every row: nothing lost if a later row fails
    print(markdown_table(all_rows, _sd3_columns(all_rows)), file=sys.stderr)
    print(f"wrote {os.path.join(args.out, 'results.md')} and results.json", file=sys.stderr)
    last = rows[-1]["metrics"]
    print(json.dumps({METRICS[m][0]: last[METRICS[m][0]] for m in metrics}))
    return 0


def row_key(contents: dict) -> str:
    """A row's identity: 16 hex digits of the sha256 of what determines its images (`contents`, JSON)."""
    return hashlib.sha256(json.dumps(contents, sort_keys=True).encode()).hexdigest()[:16]


def lora_digest(path: str) -> str:
    """The sha256 of the LoRA `SD3Pipeline.load_lora(path)` applies: of its file, or of a training workdir's
    latest adapters (and their alpha / rank), which change as the run trains on."""
    weights = os.path.join(path, PEFT_FILE) if os.path.isdir(path) else path
    if os.path.isfile(weights):
        return sha256_file(weights)
    if not os.path.isdir(path):
        raise InputError(f"--lora={path}: no such file or folder")
    try:
        flat, meta = read_lora(path)
    except InputError as e:
        raise InputError(f"--lora={path}: {e}") from e
    h = hashlib.sha256(json.dumps([meta["config"]["lora"]["alpha"], meta["config"]["lora"]["rank"]]).encode())
    for name in sorted(flat):
        h.update(f"{name}\0{flat[name].dtype}\0{flat[name].shape}\0".encode())
        h.update(np.ascontiguousarray(flat[name]).tobytes())
    return h.hexdigest()


def _changes(old: dict, new: dict) -> str:
    """What differs between two rows' `contents`, by key (`model.transformer`, `lora`, `steps: 2 -> 4`)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k} content" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif isinstance(a, str) and isinstance(b, str) and len(a) >= 16 and len(b) >= 16:
            out.append(f"{key} content")
        else:
            out.append(f"{key}: {a!r} -> {b!r}")
    return ", ".join(out)


def _check_lora(spec: dict) -> None:
    """The row's `--lora` read against its `--model`'s transformer config; one InputError naming the flag."""
    from conversion.errors import ConversionError
    from flowsteer_jax.models.loading import check_lora, check_pipeline

    if not os.path.exists(spec["lora"]):
        raise InputError(f"--lora={spec['lora']}: no such file or folder")
    check_pipeline(spec["model"], ["transformer"], what="--model")
    try:
        check_lora(spec["lora"], spec["model"])
    except (ConversionError, FileNotFoundError) as e:
        raise InputError(f"--lora={spec['lora']}: {e}") from e


def _workdir_step(lora: str | None) -> int | None:
    """The checkpoint step `SD3Pipeline.load_lora(lora)` loads when `lora` is a training workdir, else None."""
    if lora is None or not os.path.isdir(os.path.join(lora, CHECKPOINTS)):
        return None
    return resolve_step(lora)[1]


def _sample_row(args, spec: dict, prompts: list[str], row_dir: str, pipe: tuple | None):
    """Sample `prompts` for one row into `row_dir`, or reuse the images there if they were sampled for the same
    contents (the row's key), unless --resample. Images sampled for other contents are refused, naming what
    changed (a LoRA trained further, other prompts, ...): --resample replaces them, another --labels keeps both.

    `pipe`: (model folder, SD3Pipeline) of the previous row, reused for the same `--model`. Returns the pipe, the
    image files, the row's sampling provenance and its key."""
    import jax.numpy as jnp

    from conversion.errors import ConversionError
    from conversion.safetensors_io import weights_fingerprint
    from flowsteer_jax.models.loading import SD3_COMPONENTS, check_pipeline, pipeline_component, pipeline_fingerprints
    from flowsteer_jax.pipeline import SD3Pipeline
    from flowsteer_jax.sample import write_images

    skip_t5 = ("text_encoder_3", "tokenizer_3") if args.no_t5 else ()
    components = [n for n in SD3_COMPONENTS if n not in skip_t5]
    check_pipeline(spec["model"], components, what="--model")
    if spec["lora"] is not None and not os.path.exists(spec["lora"]):
        raise InputError(f"--lora={spec['lora']}: no such file or folder")
    if os.path.isdir(os.path.join(spec["model"], "scheduler")):
        components.append("scheduler")
    settings = {
        "model": os.path.abspath(spec["model"]),
        "lora": os.path.abspath(spec["lora"]) if spec["lora"] else None,
        "lora_scale": args.lora_scale,
        # a training workdir's LoRA is its newest step: a newer one is another row (and the export's card finds it)
        "lora_step": _workdir_step(spec["lora"]),
        "steps": args.steps,
        "guidance": args.guidance,
        "schedule": args.schedule,
        "seed": args.seed,
        "dtype": args.dtype,
        "height": args.height,
        "width": args.width,
        "max_sequence_length": args.max_sequence_length,
        "t5": not args.no_t5,
        "negative_prompt": args.negative_prompt,
        "prompts": len(prompts),
    }
    # What determines the images: every component's and the LoRA's content, the prompt texts in order, and the
    # sampling settings; not where the files lie.
    contents = {
        **{k: v for k, v in settings.items() if k not in ("model", "lora", "prompts")},
        "model": pipeline_fingerprints(spec["model"], components),
        "lora": lora_digest(spec["lora"]) if spec["lora"] else None,
        "prompts": {"count": len(prompts), "sha256": prompts_digest(prompts)},
    }
    key = row_key(contents)
    stamp = os.path.join(row_dir, "sampling.json")
    files = [os.path.join(row_dir, f"{i:05d}.png") for i in range(len(prompts))]
    if not args.resample and os.path.isfile(stamp):
        with open(stamp) as f:
            done = json.load(f)
        if done.get("key") != key:
            changed = _changes(done["contents"], contents) if "contents" in done else "sampled by an older evaluate"
            raise InputError(
                f"{row_dir}: its images were sampled for other contents ({changed}); --resample replaces them, "
                "another --labels samples a row beside them"
            )
        if all(os.path.isfile(f) for f in files):
            print(
                f"{spec['label']}: reusing the {len(files)} images in {row_dir} (--resample to redo)", file=sys.stderr
            )
            return pipe, files, done["provenance"], key
    if pipe is None or pipe[0] != spec["model"]:
        pipe = None  # one pipeline in memory at a time (checked by `_main` before any scorer loaded)
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
        pipe = (spec["model"], SD3Pipeline.from_pretrained(spec["model"], dtype=dtype, t5=not args.no_t5))
    model, sd3 = pipe
    if spec["lora"] is None:
        sd3.remove_lora()
    else:
        try:
            sd3.load_lora(spec["lora"], scale=args.lora_scale)
        except (ConversionError, FileNotFoundError) as e:
            raise InputError(f"--lora={spec['lora']}: {e}") from e
    height = args.height or sd3.default_sample_size * sd3.vae_scale_factor
    width = args.width or sd3.default_sample_size * sd3.vae_scale_factor
    write_images(
        sd3,
        prompts,
        row_dir,
        batch=args.batch,
        seed=args.seed,
        desc=f"sampling {spec['label']}",
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        schedule=args.schedule,
        height=height,
        width=width,
        negative_prompt=args.negative_prompt,
        max_sequence_length=args.max_sequence_length,
    )
    with open(os.path.join(row_dir, "prompts.txt"), "w") as f:  # `--images=row_dir` scores it again
        f.write("\n".join(prompts) + "\n")
    prov = {
        "sampling": {**settings, "height": height, "width": width},
        "transformer_fingerprint": weights_fingerprint(pipeline_component(spec["model"], "transformer")),
    }
    if spec["lora"] is not None:
        lora = spec["lora"]
        prov["lora_sha256"] = sha256_file(lora) if os.path.isfile(lora) else None
    prov["contents"] = contents
    with open(stamp, "w") as f:
        json.dump({"key": key, "contents": contents, "settings": settings, "provenance": prov}, f, indent=2)
    return pipe, files, prov, key


# --- the digits world ---


def _main_digits(args) -> int:
    from flowsteer_jax.digits.world import read_run

    config, world = read_run(args.digits)
    with _output(args):
        rows, header = world.evaluate_run(args.digits, config)
        columns = world.COLUMNS
        all_rows = write_report(args.out, rows, columns=columns, header=header)
    print(markdown_table(all_rows, columns), file=sys.stderr)
    last = rows[-1]["metrics"]
    print(json.dumps({k: last[k] for k, _, _ in columns if k in last}))
    return 0


def run() -> int:
    """The program (`python -m flowsteer_jax.evaluate`, `flowsteer-evaluate`)."""
    from flowsteer_jax.xla_cpu import use_inference_flags

    use_inference_flags()
    return main()


if __name__ == "__main__":
    sys.exit(run())
