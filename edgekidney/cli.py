"""The ``edgekidney`` command line: a thin layer over functions that tests call directly.

Each command parses its options and calls one function. An :class:`EdgeKidneyError` becomes
``error: <message>`` on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import sys
from pathlib import Path
from typing import List, Optional

import typer

from edgekidney.released import resolve_model
from edgekidney.errors import EdgeKidneyError
from edgekidney.jsonio import write_json
from edgekidney.outputs import check_outputs
from edgekidney.progress import echo, one_line, stage

# Plain help (click's layout): typer's rich panels print flags as `--help <bool>`.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Kidney-stone classifier for CT slices: train, export, quantize, build engines, serve.")
bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Accuracy and latency benchmarks (also in benchmarks/).")
app.add_typer(bench_app, name="bench")


def _print_version(value: bool) -> None:
    if value:
        from edgekidney import __version__

        typer.echo(f"edgekidney {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the version and exit.")):
    import warnings

    # pydicom warns once per malformed value it reads; edgekidney checks the values it needs and says
    # what it did with a file in one line, so the warning would only add lines above that answer
    warnings.filterwarnings("ignore", message=r"Invalid value for VR", category=UserWarning)


THREADS_HELP = "CPU threads for PyTorch and ONNX Runtime (default: the cores this process may use)."


def fail(message: str, code: int = 1):
    echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    echo(f"warning: {message}", err=True)


# the extra that brings each optional package (pyproject.toml); prometheus_client comes with two
EXTRAS = {"torch": "train", "torchvision": "train", "onnxscript": "train", "matplotlib": "train",
          "pylibjpeg": "dicom", "openjpeg": "dicom", "libjpeg": "dicom", "fastapi": "serve", "starlette": "serve",
          "anyio": "serve", "uvicorn": "serve", "multipart": "serve", "python_multipart": "serve",
          "nibabel": "nifti", "highdicom": "sr", "pynetdicom": "net", "tensorrt": "trt", "pycuda": "trt",
          "tritonclient": "triton", "prometheus_client": "serve"}


def missing_extra(module: str | None, command: str) -> str | None:
    """The extra to install for a missing module (None: not an optional package: a broken install)."""
    top = (module or "").split(".")[0]
    try:
        installed = bool(top) and importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):  # a module set to None, or a broken package: not importable
        installed = False
    if not top or installed:  # installed, and a part of it is missing (versions that do not match?)
        return None
    if top == "prometheus_client" and command.startswith("listen"):
        return "net"
    return EXTRAS.get(top)


def user_errors(fn):
    """Turn an EdgeKidneyError into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeKidneyError as exc:
            fail(str(exc))
        except ModuleNotFoundError as exc:  # an optional package imported where the command first needs it
            extra = missing_extra(exc.name, fn.__name__)
            if extra is None:
                raise
            fail(f"this command needs {exc.name}: pip install 'edgekidney[{extra}]'")
        except OSError as exc:  # writing a result (a full disk, a path we may not write): one line, not a traceback
            what = exc.strerror or str(exc) or type(exc).__name__
            fail(f"{exc.filename}: {what}" if exc.filename else what)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


def command(*args, **kwargs):
    def register(fn):
        return app.command(*args, **kwargs)(user_errors(fn))

    return register


def echo_json(obj, path: Optional[Path]) -> None:
    if path is not None:
        write_json(obj, path)


# --------------------------------------------------------------------------------------------------
@command("synth")
def synth_cmd(
    out: Path = typer.Argument(..., help="Folder to write Normal/ and Stone/ DICOM slices into."),
    patients: int = typer.Option(24, min=2, help="Synthetic patients (each contributes to both classes)."),
    slices: int = typer.Option(5, min=1, help="Slices per class per patient."),
    size: int = typer.Option(256, min=32, help="Slice size in pixels."),
    seed: int = typer.Option(0),
    series: int = typer.Option(0, min=0, help="Write N whole synthetic series (3-D phantoms) instead of slices."),
    series_slices: int = typer.Option(40, min=8, help="Slices per series with --series."),
):
    """Write synthetic CT-like DICOM slices (clearly labelled synthetic, licence-free)."""
    if series:
        from edgekidney.data.synthetic_series import write_series_set
        from edgekidney.jsonio import write_json

        truths = write_series_set(out, n_series=series, slices=series_slices, size=size, seed=seed)
        write_json([t.to_dict() for t in truths], out / "truth.json")
        typer.echo(f"wrote {series} synthetic series of {series_slices} slices to {out} (ground truth: truth.json)")
        return
    from edgekidney.data.synthetic import SynthConfig, generate

    counts = generate(out, SynthConfig(patients=patients, slices_per_class=slices, size=size, seed=seed))
    typer.echo(f"wrote {sum(counts.values())} synthetic slices to {out}: {counts}")


@command("train")
def train_cmd(
    data: Path = typer.Argument(..., help="Dataset folder: one sub-folder per class (Normal/, Stone/, ...)."),
    out: Path = typer.Option(..., "--out", help="Run directory to write model.pt, split.csv, metrics.json into."),
    classes: Optional[str] = typer.Option(None, help="Classes to use, in order (default: every class folder; "
                                                      "the others are hard negatives for the positive one)."),
    positive: Optional[str] = typer.Option(None, help="Positive class for stone metrics (default: named like 'stone')."),
    weights: str = typer.Option("imagenet", help="imagenet | none | PATH to a local ResNet50 state dict or an edgekidney checkpoint | a released model (name or folder) or an FP16/FP32 .onnx export to fine-tune."),
    weights_sha256: Optional[str] = typer.Option(None, help="Expected sha256 of --weights PATH."),
    image_size: int = typer.Option(256, min=32),
    epochs: int = typer.Option(12, min=1),
    freeze_epochs: int = typer.Option(2, min=0, help="Epochs with the backbone frozen before fine-tuning all layers."),
    batch_size: int = typer.Option(16, min=2),
    lr: float = typer.Option(1e-3),
    backbone_lr_scale: float = typer.Option(0.1, min=0.0, max=1.0,
                                            help="Learning rate of transferred layers = --lr times this."),
    patience: int = typer.Option(4, min=1, help="Early stopping: epochs without a better validation AUC."),
    label_smoothing: float = typer.Option(0.1, min=0.0, max=0.5),
    target_sensitivity: float = typer.Option(0.95, min=0.01, max=1.0),
    val_fraction: float = typer.Option(0.2), test_fraction: float = typer.Option(0.0),
    block_size: int = typer.Option(20, min=1, help="File-number block = one group when no DICOM patient id."),
    window_center: float = typer.Option(40.0, help="CT window centre (HU) for DICOM."),
    window_width: float = typer.Option(400.0, help="CT window width (HU) for DICOM."),
    png16_hu_offset: Optional[int] = typer.Option(None, help="Read 16-bit PNGs as HU + OFFSET (else full-range)."),
    augment: str = typer.Option("all", help="all | none | comma list of geometry, scale, intensity, window, "
                                            "noise, calculus."),
    balanced: bool = typer.Option(True, help="Class-balanced sampling (else a class-weighted loss)."),
    calculus_fraction: float = typer.Option(0.3, min=0.0, max=1.0,
                                            help="Share of non-stone slices given a placed-calculus twin."),
    calculus_level: str = typer.Option("0.9,1.0", metavar="LO,HI",
                                       help="The twins' calculus level in window units (1: the window's top); "
                                            "above 1 it stays saturated through its blur, e.g. 1.4,3.4."),
    erase_fraction: float = typer.Option(0.0, min=0.0, max=1.0,
                                         help="Share of outlined stone slices given a twin with the stone painted "
                                              "over, labelled --erase-class (see docs/scope.md before using it)."),
    erase_class: str = typer.Option("Normal", help="Class of the erased-stone twins (two classes: the other one; "
                                                   "'not-stone': trained only away from the stone class)."),
    body_crop: bool = typer.Option(True, help="Crop each slice to the patient's outline before resizing."),
    body_level: float = typer.Option(0.5, min=0.0, max=1.0,
                                     help="Scale each slice so the body's median intensity is this (0: off)."),
    scope_quantile: float = typer.Option(0.99, min=0.5, max=1.0, help="Out of scope: validation distance quantile..."),
    scope_margin: float = typer.Option(1.0, min=1.0, help="... times this margin is the threshold."),
    stone_map: bool = typer.Option(True, help="Train the stride-8 stone map that the slice decision reads "
                                              "(--no-stone-map: plain ResNet50 with a class activation map)."),
    stone_masks: Optional[Path] = typer.Option(None, help="Folder of stone masks (same relative paths, .png); "
                                                          "default: DATA-stones beside DATA when it exists."),
    map_loss_weight: float = typer.Option(1.0, min=0.0, help="Weight of the stone map's losses."),
    map_gate: bool = typer.Option(True, help="After training, fit the map gate: no stone call on a slice whose map "
                                             "finds no stone (see docs/architecture.md)."),
    tune_layers: Optional[str] = typer.Option(None, help="ResNet50 stages that learn with the new layers while the "
                                                         "backbone is frozen, e.g. layer2,layer3."),
    autocast: str = typer.Option("auto", help="auto (bfloat16 where the CPU or GPU runs it natively) | bf16 | off"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    seed: int = typer.Option(0),
    nproc_per_node: int = typer.Option(1, min=1, help="DDP: processes on this machine (gloo on CPU, NCCL on "
                                                      "CUDA); several machines: torchrun, see docs/triton.md."),
):
    """Fine-tune ResNet50 on a folder of CT slices."""
    from edgekidney.data.dataset import SplitConfig, parse_classes
    from edgekidney.data.preprocess import Preprocessing
    from edgekidney.model.feed import parse_level
    from edgekidney.model.train import TrainConfig, train

    pre = Preprocessing(image_size=image_size, window_center=window_center, window_width=window_width,
                        png16_hu_offset=png16_hu_offset, body_crop=body_crop, body_level=body_level or None)
    cfg = TrainConfig(data=data, out=out, classes=parse_classes(classes), positive_class=positive, weights=weights,
                      weights_sha256=weights_sha256, image_size=image_size, epochs=epochs, freeze_epochs=freeze_epochs,
                      batch_size=batch_size, lr=lr, backbone_lr_scale=backbone_lr_scale, patience=patience,
                      label_smoothing=label_smoothing,
                      target_sensitivity=target_sensitivity, seed=seed, device=device, threads=threads, augment=augment,
                      balanced=balanced, calculus_fraction=calculus_fraction,
                      calculus_level=parse_level(calculus_level),
                      erase_fraction=erase_fraction, erase_class=erase_class, scope_quantile=scope_quantile,
                      scope_margin=scope_margin, stone_map=stone_map, stone_masks=stone_masks,
                      map_loss_weight=map_loss_weight, map_gate=map_gate, autocast=autocast,
                      tune_layers=tuple(t.strip() for t in (tune_layers or "").split(",") if t.strip()),
                      split=SplitConfig(val_fraction, test_fraction, block_size, seed), preprocessing=pre)
    from edgekidney.model.distributed import init_from_env, launch, rank_output

    dist = None if nproc_per_node > 1 else init_from_env(device)  # under torchrun: this process's rank
    if nproc_per_node > 1:
        metrics = launch(cfg, nproc_per_node)
    elif dist is None:
        metrics = train(cfg, log=echo)
    else:
        with rank_output(cfg, dist) as mine:  # rank 0 writes RUN, the others a temporary folder
            metrics = train(mine, log=echo if dist.main else (lambda s: None))
        if not dist.main:
            return
    from edgekidney.metrics import format_report

    typer.echo(format_report(metrics["val"], f"validation (best epoch {metrics['best_epoch']}, "
                                             f"threshold for sensitivity >= {target_sensitivity}):"))
    typer.echo(f"wrote {out / 'model.pt'}, {out / 'metrics.json'}")


@command("refit")
def refit_cmd(
    run: Path = typer.Argument(..., help="A finished stone-map training run (its folder)."),
    map_gate: bool = typer.Option(True, help="Fit the map gate (--no-map-gate: switch it off)."),
    scope_quantile: Optional[float] = typer.Option(None, min=0.5, max=1.0,
                                                   help="Out of scope: validation distance quantile (default: the run's)."),
    scope_margin: Optional[float] = typer.Option(None, min=1.0, help="... times this margin (default: the run's)."),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
):
    """Refit what training fits on the validation split after its best epoch: map gate, thresholds."""
    from edgekidney.metrics import format_report
    from edgekidney.model.refit import refit_run

    metrics = refit_run(run, map_gate=map_gate, scope_quantile=scope_quantile, scope_margin=scope_margin,
                        threads=threads, log=echo)
    typer.echo(format_report(metrics["val"], "validation after the refit:"))
    typer.echo(f"wrote {run / 'model.pt'}, {run / 'metrics.json'}")


@command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="Run directory (or its model.pt)."),
    out: Path = typer.Option(..., "--out", help="ONNX file to write; the sidecar goes next to it (.json)."),
    opset: int = typer.Option(18, min=17),
    parity_images: int = typer.Option(8, min=1),
    tolerance: float = typer.Option(1e-3),
):
    """Export a checkpoint to ONNX with a JSON sidecar and a PyTorch parity check."""
    from edgekidney.model.export import export_onnx

    card = export_onnx(run, out, opset=opset, parity_images=parity_images, tolerance=tolerance)
    parity = card.extra["parity"]
    typer.echo(f"wrote {out} (sha256 {card.sha256[:12]}), parity max |dlogit| {parity['max_abs_logit_diff']:.2e} "
               f"on {parity['n_images']} real slices")


@command("evaluate")
def evaluate_cmd(
    model: Path = typer.Argument(..., help="Checkpoint (RUN or model.pt), ONNX model or engine."),
    data: Path = typer.Argument(..., help="Dataset folder, or a split manifest (RUN/split.csv)."),
    split: Optional[str] = typer.Option(None, help="train | val | test: evaluate one split only."),
    classes: Optional[str] = typer.Option(None, help="Class folders to use (default: all, which the model must know)."),
    target_sensitivity: float = typer.Option(0.95, min=0.01, max=1.0),
    store_threshold: bool = typer.Option(False, help="Write the threshold for the target sensitivity into the sidecar."),
    backend: Optional[str] = typer.Option(None, help="ort | trt (default from the model file)."),
    batch_size: int = typer.Option(16, min=1),
    bootstrap: int = typer.Option(2000, min=100, help="Bootstrap resamples for the 95 % intervals."),
    seed: int = typer.Option(0, help="Seed of the bootstrap."),
    plots: Optional[Path] = typer.Option(None, help="Folder for roc.png and reliability.png."),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON ('-' for stdout)."),
):
    """Sensitivity, specificity, AUC, confusion matrix, confounders and intervals on labelled slices."""
    from edgekidney.data.dataset import parse_classes
    from edgekidney.model.evaluate import evaluate, format_confounders, is_checkpoint

    checkpoint = is_checkpoint(model)
    model = model if checkpoint else resolve_model(model)
    from edgekidney.metrics import format_report
    from edgekidney.runtime.predict import default_backend_for

    # a checkpoint runs in PyTorch (which takes --threads too); an artifact on the backend its sidecar names
    options = {"threads": threads} if checkpoint or (backend or default_backend_for(model)) == "ort" else {}
    result = evaluate(model, data, split=split, classes=parse_classes(classes), batch_size=batch_size,
                      target_sensitivity=target_sensitivity, store_threshold=store_threshold, backend=backend,
                      bootstrap_resamples=bootstrap, seed=seed, plot_dir=plots, **options)
    for w in result["warnings"]:
        warn(w)
    if str(json_out) != "-":
        typer.echo(format_report(result["at_model_threshold"], f"{result['data']}, {result['n']} slices, "
                                                               f"at the model's threshold:"))
        typer.echo(format_confounders(result))
        if result["scope"]["detector"] is None:
            typer.echo("  warning: this model has no out-of-scope detector (exported before edgekidney 0.2?)")
        typer.echo(f"  threshold for sensitivity >= {target_sensitivity}: {result['threshold_for_target']:.4f} "
                   f"(specificity there {result['at_target_threshold']['specificity']:.4f})")
        if store_threshold:
            typer.echo(f"stored threshold in {result['stored_threshold_in']}")
            for child in result["stale_children"]:
                typer.echo(f"warning: {child['message']}", err=True)
    echo_json(result, json_out)


@command("infer")
def infer_cmd(
    model: Path = typer.Argument(..., help="ONNX model (with sidecar) or TensorRT engine; with --server, "
                                            "the first input file."),
    paths: List[Path] = typer.Argument(None, help="Image/DICOM files and folders."),
    backend: Optional[str] = typer.Option(None, help="ort | trt (default: from the model file)."),
    device: Optional[str] = typer.Option(None, help="ONNX Runtime: cpu (default) | cuda | tensorrt | auto; TensorRT: GPU index."),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    batch_size: int = typer.Option(8, min=1),
    threshold: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Override the sidecar's threshold."),
    keep_going: bool = typer.Option(False, help="Skip bad files, report them, exit non-zero at the end."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write results as JSON ('-' for stdout)."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write results as CSV ('-' for stdout)."),
    cam: Optional[Path] = typer.Option(None, help="Folder for activation-map PNG overlays of slices called stone."),
    cam_all: bool = typer.Option(False, help="With --cam: an overlay for every slice."),
    server: Optional[str] = typer.Option(None, help="Send the slices to an inference server (Open Inference "
                                                    "Protocol: edgekidney serve or Triton), e.g. http://host:8080."),
    model_name: str = typer.Option("edgekidney", help="With --server: the model's name on the server."),
    sidecar: Optional[Path] = typer.Option(None, help="With --server: the sidecar JSON for a server that does not "
                                                      "carry it (local preprocessing)."),
    send: str = typer.Option("auto", help="With --server: auto | bytes (files) | tensor (preprocessed here)."),
    api_key: Optional[str] = typer.Option(None, envvar="EDGEKIDNEY_API_KEY", help="With --server: its API key."),
):
    """Classify CT slices: stone probability, label and whether each slice is in scope."""
    check_outputs([*(paths or []), *([model] if server else [])], files={"--json": json_out, "--csv": csv_out},
                  folders={"--cam": cam}, model=None if server else model)
    model = model if server else resolve_model(model)
    from edgekidney.runtime.predict import Classifier, expand_inputs, write_cams
    from edgekidney.data.provenance import mismatch_warning

    if server is not None:
        from edgekidney.runtime.remote import RemoteClassifier

        if cam is not None:
            fail("--cam needs a local model; it is not available with --server")
        files = expand_inputs([model, *(paths or [])])
        with RemoteClassifier(server, model_name, sidecar=sidecar, send=send, threshold=threshold,
                              api_key=api_key) as clf:
            with stage("classifying", len(files), "file") as bar:
                preds, failures = clf.predict_files(files, batch_size=batch_size, keep_going=keep_going,
                                                    progress=bar.advance)
            clf.threshold = clf.model.threshold
            positive_class = clf.model.positive_class
    else:
        from edgekidney.lineage import threshold_status

        with Classifier(model, backend=backend, threshold=threshold, device=device,
                        threads=threads) as clf:  # the model first, as given
            status = threshold_status(model, clf.card)
            if status.stale and threshold is None:
                warn(status.message)
            files = expand_inputs(paths or [])
            mismatch = mismatch_warning(clf.card.extra.get("data"), files)
            if mismatch:
                warn(mismatch)
            with stage("classifying", len(files), "file") as bar:
                preds, failures = clf.predict_files(files, batch_size=batch_size, keep_going=keep_going,
                                                    want_cam=cam is not None, progress=bar.advance)
        positive_class = clf.card.positive_class
    if cam is not None:
        write_cams(preds, cam, clf.card, everything=cam_all)
    rows = [p.to_dict() for p in preds]
    to_stdout = "-" in (str(json_out), str(csv_out))
    if not to_stdout:
        source = "--threshold" if threshold is not None else ("the server's model" if server else "the model's sidecar")
        echo(format_predictions(rows, positive_class, clf.threshold, source))
    if json_out is not None:
        echo_json({"model": str(model) if server is None else f"{server} {model_name}", "threshold": clf.threshold,
                   "predictions": rows,
                   "failures": [f.__dict__ for f in failures]}, json_out)
    if csv_out is not None:
        fh = sys.stdout if str(csv_out) == "-" else open(csv_out, "w", newline="")
        w = csv.DictWriter(fh, fieldnames=["path", "probability", "label", "threshold", "in_scope", "scope_distance",
                                           "scope_threshold", "scope_reason", "cam_peak_row", "cam_peak_col"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows({**row, **dict(zip(("cam_peak_row", "cam_peak_col"), row.get("cam_peak") or (None, None)))}
                    for row in rows)
        if fh is not sys.stdout:
            fh.close()
    for f in failures:
        echo(f"skipped: {f.error}", err=True)
    if failures:
        fail(f"{len(failures)} of {len(files)} file(s) could not be classified")


@command("study")
def study_cmd(
    model: Path = typer.Argument(..., help="ONNX model (with sidecar) or TensorRT engine."),
    paths: List[Path] = typer.Argument(..., help="DICOM files and folders (recursive), NIfTI volumes (.nii, .nii.gz)."),
    plane: str = typer.Option("axial", help="axial (slices as acquired) | coronal (resampled with the real spacing)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the study result as JSON ('-' for stdout)."),
    sr_out: Optional[Path] = typer.Option(None, "--sr-out", help="Write one DICOM SR (TID 1500) per DICOM series here."),
    sc_out: Optional[Path] = typer.Option(None, "--sc-out", help="Write the peak slice of each DICOM series as a "
                                                                 "Secondary Capture with the activation map here."),
    min_run: Optional[int] = typer.Option(None, min=1, help="Override the rule: consecutive positive slices for 'stone'."),
    threshold: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Override the slice threshold."),
    min_focus_hu: Optional[float] = typer.Option(None, min=-1024.0, max=4000.0, metavar="HU",
                                                 help="Count a slice towards 'stone' only when a pixel within 10 mm "
                                                      "of its peak reaches HU (e.g. 200 on CT without contrast)."),
    coronal_spacing: Optional[float] = typer.Option(None, min=0.1, help="mm between coronal slices (default: the "
                                                                        "axial slice spacing)."),
    keep_identifiers: bool = typer.Option(False, help="Put SeriesInstanceUIDs / file paths in the JSON (else hashes)."),
    backend: Optional[str] = typer.Option(None, help="ort | trt (default: from the model file)."),
    threads: Optional[int] = typer.Option(None, min=1, help="Intra-op threads for ONNX Runtime (default: all cores "
                                                            "but one, which decodes and preprocesses)."),
    batch_size: int = typer.Option(8, min=1),
):
    """A whole CT study: one decision per series (stone | no_stone | not_assessable) with the slices behind it."""
    check_outputs(paths, files={"--json": json_out}, folders={"--sr-out": sr_out, "--sc-out": sc_out}, model=model)
    model = resolve_model(model)
    from dataclasses import replace

    from edgekidney.runtime.predict import Classifier
    from edgekidney.study import StudyRule, analyze_study
    from edgekidney.study.planes import check_plane
    from edgekidney.study.report import format_study

    check_plane(plane)
    # The decode/preprocess thread needs a core: ORT gets the others (1 of 2) and its threads do not spin
    if threads is None:
        import os

        threads = max(1, (os.cpu_count() or 2) - 1)
    options = {"threads": threads, "spinning": False} if (backend or "ort") == "ort" and model.suffix == ".onnx" else {}
    written: list[str] = []
    with Classifier(model, backend=backend, **options) as clf:
        rule = StudyRule.from_card(clf.card)
        if min_run is not None or threshold is not None or min_focus_hu is not None:
            rule = replace(rule, min_run=min_run or rule.min_run,
                           threshold=threshold if threshold is not None else rule.threshold,
                           min_focus_hu=min_focus_hu if min_focus_hu is not None else rule.min_focus_hu,
                           source="option")

        def file_back(result, series):
            if series.kind != "dicom" or series.refusal:
                return
            if sr_out is not None:
                from edgekidney.study.sr import write_sr

                written.append(str(write_sr(result, series, sr_out)))
            if sc_out is not None and result.peak is not None and result.plane != series.acquired_plane:
                result.warnings.append("no Secondary Capture: a reformatted slice has no single source instance")
            elif sc_out is not None and result.peak is not None:
                from edgekidney.study.sc import write_sc

                written.extend(str(p) for p in write_sc(result, series, sc_out, clf))

        study = analyze_study(clf, paths, plane=plane, rule=rule, batch_size=batch_size,
                              keep_identifiers=keep_identifiers, coronal_spacing_mm=coronal_spacing,
                              on_series=file_back)
    if str(json_out) != "-":
        echo(format_study(study))
        for w in written:
            typer.echo(f"wrote {w}")
    if json_out is not None:
        echo_json({"model": model.name, **study.to_dict()}, json_out)


def format_predictions(rows: list[dict], positive: str, threshold: float, source: str) -> str:
    """The infer table, with the threshold in use and where it came from."""
    width = max([len(one_line(r["path"])) for r in rows] + [4])
    head = f"p({positive})"
    lines = [f"label = {positive} when p({positive}) >= {threshold:.4f} (threshold from {source}), "
             "out_of_scope when the slice is unlike the training data",
             f"{'path':<{width}}  {head:>10}  {'threshold':>9}  {'in scope':>8}  label"]
    for r in rows:
        scope = "-" if r.get("in_scope") is None else ("yes" if r["in_scope"] else "NO")
        lines.append(f"{one_line(r['path']):<{width}}  {r['probability']:>10.4f}  {r['threshold']:>9.4f}  {scope:>8}  {r['label']}")
    return "\n".join(lines)


@command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the synthetic data and all artifacts."),
    epochs: int = typer.Option(10, min=1), image_size: int = typer.Option(128, min=32),
    patients: int = typer.Option(40, min=4), seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
):
    """The whole job on built-in synthetic CT slices: data -> train -> ONNX -> evaluate -> infer."""
    from edgekidney.demo import run_demo

    run_demo(out, epochs=epochs, image_size=image_size, patients=patients, seed=seed, threads=threads, log=echo)


# -- quantization commands ----------------------------------------------------------------
@command("calibrate")
def calibrate_cmd(
    data: Path = typer.Argument(..., help="Dataset folder (class folders) the model was trained on."),
    model: Path = typer.Option(..., "--model", help="The FP32 ONNX model (with sidecar) to calibrate for."),
    out: Path = typer.Option(..., "--out", help="Calibration folder to write, e.g. calibration/ct-axial-256."),
    manifest: Optional[Path] = typer.Option(None, "--manifest",
                                            help="Split manifest (RUN/split.csv; default: the one the sidecar names)."),
    n: int = typer.Option(256, "--n", min=2, help="Number of slices (stratified by class)."),
    seed: int = typer.Option(0),
):
    """Choose N training slices, stratified by class, and store them preprocessed for INT8 calibration (no torch)."""
    from edgekidney.optimize.calibrate import make_calibration_set

    with stage("preprocessing calibration slices", n, "slice") as bar:
        cal = make_calibration_set(data, resolve_model(model), out, manifest=manifest, n=n, seed=seed,
                                   progress=bar.advance)
    typer.echo(f"wrote {cal.info['n']} slices {cal.info['per_class']} to {out} "
               f"(skipped {cal.info['held_out_images_skipped']} validation/test slices; "
               f"{cal.info['split_manifest_check']})")


@command("quantize")
def quantize_cmd(
    model: Path = typer.Argument(..., help="FP32 ONNX model (with sidecar)."),
    out: Path = typer.Option(..., "--out", help="Quantized ONNX model to write."),
    precision: str = typer.Option(..., help="fp16 | int8"),
    target: str = typer.Option("cpu", help="int8 flavour: trt (symmetric Q/DQ for TensorRT) | cpu (U8S8 for ORT)."),
    calibration: Optional[Path] = typer.Option(None, help="Calibration folder from 'edgekidney calibrate'."),
    method: str = typer.Option("minmax", help="minmax | entropy | percentile"),
    keep: List[str] = typer.Option([], help="Node to keep in FP32 (repeatable): first-conv, last-fc or a node name."),
    per_channel: bool = typer.Option(True, help="Per-channel weight scales."),
    max_calibration: Optional[int] = typer.Option(None, min=1, help="Use only the first N calibration slices."),
):
    """Write an FP16 or INT8 (Q/DQ) model; the precision lives in the graph."""
    from edgekidney.optimize.quantize import Method, Precision, QuantizeConfig, Target, quantize

    try:
        cfg = QuantizeConfig(precision=Precision(precision), target=Target(target), method=Method(method),
                             calibration=calibration, keep=list(keep), per_channel=per_channel,
                             max_calibration=max_calibration)
    except ValueError as exc:
        fail(f"bad option: {exc}")
    card = quantize(resolve_model(model), out, cfg, log=typer.echo)
    q = card.extra["quantization"]
    typer.echo(f"wrote {out} ({card.precision}{' ' + q['target'] if q.get('target') else ''}) in {q['seconds']} s; "
               f"vs FP32 on {q['check_n']} {q['check_inputs']}: max |dlogit| {q['max_abs_logit_diff']:.4f}, "
               f"top-1 agreement {q['top1_agreement']:.4f}")


@bench_app.command("accuracy")
@user_errors
def bench_accuracy_cmd(
    models: List[Path] = typer.Argument(..., help="FP32 model and its quantized children."),
    data: Path = typer.Option(..., "--data", help="Labelled dataset folder or split manifest."),
    split: Optional[str] = typer.Option(None), classes: Optional[str] = typer.Option(None),
    reference: Optional[Path] = typer.Option(None, help="Reference model (default: the FP32 one)."),
    backend: Optional[str] = typer.Option(None),
    max_accuracy_drop: float = typer.Option(0.5, help="Gate, percentage points."),
    max_sensitivity_drop: float = typer.Option(1.0, help="Gate, percentage points."),
    min_agreement: float = typer.Option(0.99, help="Gate: top-1 agreement with the reference."),
    json_out: Optional[Path] = typer.Option(None, "--json"),
):
    """Accuracy of quantized models against their FP32 parent; exit 1 when a gate fails."""
    from edgekidney.bench.accuracy import Gates, format_table, run_accuracy
    from edgekidney.data.dataset import parse_classes

    result = run_accuracy([resolve_model(m) for m in models], data, split, parse_classes(classes),
                          Gates(max_accuracy_drop, max_sensitivity_drop, min_agreement),
                          None if reference is None else resolve_model(reference), backend=backend,
                          log=lambda s: typer.echo(s, err=True))
    typer.echo(format_table(result))
    echo_json(result, json_out)
    if not result["passed"]:
        failed = result.get("failed") or []
        typer.echo(f"error: accuracy gate failed: {', '.join(map(str, failed)) or 'see the table'}", err=True)
        raise typer.Exit(1)


@bench_app.command("latency")
@user_errors
def bench_latency_cmd(
    models: List[Path] = typer.Argument(..., help="ONNX models (or engines with --backend trt)."),
    backend: str = typer.Option("ort"), batch_sizes: str = typer.Option("1,8,32"),
    threads: int = typer.Option(2, min=1), seconds: float = typer.Option(3.0, help="Time budget per configuration."),
    torch: str = typer.Option("auto", help="PyTorch eager baseline: auto | none | checkpoint."),
    data: Optional[Path] = typer.Option(None, help="Real slices for the end-to-end rows (default: synthetic)."),
    baseline: Optional[Path] = typer.Option(None, help="Earlier report to compare with."),
    max_slowdown: float = typer.Option(0.10),
    json_out: Optional[Path] = typer.Option(None, "--json"), plot: Optional[Path] = typer.Option(None),
):
    """Latency percentiles and throughput per model, backend and batch size."""
    from edgekidney.bench.latency import main as latency_main

    form = "gpu" if backend == "trt" else "cpu"
    argv = [str(resolve_model(m, form)) for m in models] + [
        "--backend", backend, "--batch-sizes", batch_sizes, "--threads", str(threads), "--seconds", str(seconds),
        "--torch", torch, "--max-slowdown", str(max_slowdown)]
    for flag, value in (("--data", data), ("--baseline", baseline), ("--json", json_out), ("--plot", plot)):
        if value is not None:
            argv += [flag, str(value)]
    raise typer.Exit(latency_main(argv))



# -- TensorRT engine commands -------------------------------------------------------------
@command("build-engine")
def build_engine_cmd(
    model: Path = typer.Argument(..., help="ONNX model with its sidecar (FP32, FP16 or Q/DQ INT8: precision is in the graph)."),
    out: str = typer.Option(..., "--out", help="Engine file to write (sidecar: OUT.json); a folder/ names it by cache key."),
    min_batch: int = typer.Option(1, help="Smallest batch of the optimization profile."),
    opt_batch: int = typer.Option(8, help="Batch TensorRT tunes for."),
    max_batch: int = typer.Option(32, help="Largest batch; larger ones are split at run time."),
    workspace: Optional[int] = typer.Option(None, help="Builder workspace limit in MiB (default: TensorRT's)."),
    timing_cache: Optional[str] = typer.Option(None, help="Timing cache file (or folder/) to reuse and save."),
    version_compatible: bool = typer.Option(False, help="Engine runs on this and later TensorRT releases."),
    hardware_compatibility: Optional[str] = typer.Option(None, help="ampere_plus | same_compute_capability (not on JetPack)."),
    tf32: bool = typer.Option(False, help="Allow TF32 math in FP32 layers (off: FP32 stays FP32)."),
    force: bool = typer.Option(False, help="Rebuild even if OUT already is this engine."),
    verbose: bool = typer.Option(False, help="Show TensorRT's info messages."),
):
    """Build a TensorRT engine (strongly typed, dynamic batch) for this GPU and TensorRT version."""
    model = resolve_model(model, form='gpu')
    from edgekidney.optimize.engine import EngineBuildConfig, build_engine
    from edgekidney.runtime.engine_compat import BatchProfile

    cfg = EngineBuildConfig(profile=BatchProfile(min_batch, opt_batch, max_batch), workspace_mib=workspace,
                            timing_cache=timing_cache, version_compatible=version_compatible,
                            hardware_compatibility=hardware_compatibility, tf32=tf32, force=force, verbose=verbose)
    build_engine(model, out, cfg, log=typer.echo)



# -- Triton model repository --------------------------------------------------------------
@command("export-triton")
def export_triton_cmd(
    model: Path = typer.Argument(..., help="ONNX model or TensorRT engine, with its sidecar."),
    repo: Path = typer.Option(..., "--repo", help="Triton model repository folder (created if missing)."),
    name: str = typer.Option("edgekidney", help="Model name (the folder under --repo)."),
    version: int = typer.Option(1, min=1, help="Version folder."),
    max_batch_size: Optional[int] = typer.Option(None, min=1, help="Default: the engine profile's largest batch, "
                                                                    "an ONNX graph's fixed batch, else 8."),
    queue_delay_us: int = typer.Option(5000, min=0, help="Dynamic batching: longest a request waits for others."),
    instance_kind: str = typer.Option("auto", help="auto | cpu | gpu (auto: GPU for engines, CPU for ONNX)."),
    instances: int = typer.Option(1, min=1, help="Model instances."),
    force: bool = typer.Option(False, help="Replace REPO/NAME if it exists."),
):
    """Write a Triton model repository entry: NAME/config.pbtxt, NAME/VERSION/model.onnx|model.plan + sidecar."""
    from edgekidney.server.triton_repo import DEFAULT_RELEASE, TritonExportConfig, export_triton, triton_release
    from edgekidney.sidecar import load_card

    model = resolve_model(model, form="gpu" if instance_kind == "gpu" else "cpu")
    path = export_triton(model, repo, TritonExportConfig(name=name, version=version, max_batch_size=max_batch_size,
                                                         queue_delay_us=queue_delay_us, instance_kind=instance_kind,
                                                         instance_count=instances, force=force))
    typer.echo(f"wrote {path} and {path.parent / str(version)}")
    card = load_card(model, verify_hash=False)
    release = triton_release(card) if card.kind == "engine" else DEFAULT_RELEASE
    if release is None:
        typer.echo("warning: no Triton release known for this engine's TensorRT "
                   f"{card.extra.get('engine', {}).get('tensorrt_version')}: use the one that ships it", err=True)
        release = DEFAULT_RELEASE
    gpus = "--gpus all " if card.kind == "engine" or instance_kind == "gpu" else ""
    typer.echo(f"run: docker run --rm {gpus}-p 8000:8000 -p 8001:8001 -p 8002:8002 -v {repo.resolve()}:/models "
               f"nvcr.io/nvidia/tritonserver:{release}-py3 tritonserver --model-repository=/models")


# -- service commands ----------------------------------------------------------------------


@command("serve")
def serve_cmd(
    model: Path = typer.Argument(..., help="ONNX model (with sidecar) or TensorRT engine."),
    backend: Optional[str] = typer.Option(None, help="ort | trt (default: from the model file)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; loopback by default."),
    port: int = typer.Option(8080, min=1, max=65535),
    device: Optional[str] = typer.Option(None, help="ONNX Runtime: cpu (default) | cuda | tensorrt | auto; TensorRT: GPU index."),
    threads: Optional[int] = typer.Option(None, min=1, help="Intra-op threads (ONNX Runtime only)."),
    threshold: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Override the sidecar's threshold."),
    max_batch: int = typer.Option(8, min=0, help="Images per micro-batch; 0 or 1 turns micro-batching off."),
    max_wait_ms: float = typer.Option(5.0, min=0.0, help="Longest a batch waits for requests on their way."),
    no_batching: bool = typer.Option(False, "--no-batching", help="Run every request alone (same as --max-batch 1)."),
    max_body_mb: float = typer.Option(64.0, min=0.001, help="Larger request bodies get 413."),
    max_images: int = typer.Option(64, min=1, help="Most images (parts) in one multipart request."),
    max_queue: int = typer.Option(64, min=1, help="Requests admitted at once (decoding or queued); more get 503."),
    request_timeout: float = typer.Option(30.0, min=0.001, help="Seconds before a request is answered 504."),
    decode_threads: int = typer.Option(2, min=1, help="Images decoded at once (bounds upload memory)."),
    api_key: Optional[str] = typer.Option(None, envvar="EDGEKIDNEY_API_KEY", show_envvar=True,
                                          help="Require this key (Authorization: Bearer KEY or X-API-Key)."),
    graceful_timeout: float = typer.Option(30.0, min=0.0, help="Seconds in-flight requests get after SIGTERM."),
    log_level: str = typer.Option("info", help="debug | info | warning | error"),
    simulate_latency_ms: float = typer.Option(0.0, min=0.0, hidden=True, help="Testing: sleep before each batch."),
    model_name: str = typer.Option("edgekidney", help="The model's name under /v2/models/ (Open Inference Protocol)."),
):
    """HTTP inference service: POST /v1/predict, /v2 (Open Inference Protocol), /healthz, /readyz, /metrics."""
    model = resolve_model(model)
    from edgekidney.server import ServeConfig, serve

    serve(ServeConfig(model=model, backend=backend, host=host, port=port, device=device, threads=threads,
                      threshold=threshold, max_batch=1 if no_batching else max_batch, max_wait_ms=max_wait_ms,
                      max_body_mb=max_body_mb, max_images=max_images, max_queue=max_queue,
                      request_timeout_s=request_timeout, decode_threads=decode_threads, api_key=api_key,
                      graceful_timeout_s=graceful_timeout, log_level=log_level,
                      simulate_latency_ms=simulate_latency_ms, oip_model_name=model_name))


# -- DICOM listener -----------------------------------------------------------------------
@command("listen")
def listen_cmd(
    model: Path = typer.Argument(..., help="ONNX model (with sidecar) or TensorRT engine."),
    store: Path = typer.Option(..., "--store", help="Folder for received instances, results and the job table."),
    ae_title: str = typer.Option("EDGEKIDNEY", "--ae-title", help="Our AE title."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; loopback by default."),
    port: int = typer.Option(11112, min=0, max=65535),
    destination: Optional[str] = typer.Option(None, help="HOST:PORT:AETITLE to C-STORE results (SR) to."),
    series_timeout: float = typer.Option(10.0, min=0.01, help="Seconds without a new instance until a series is complete."),
    restart_grace: float = typer.Option(120.0, min=0.0, help="After a restart, seconds more that a series still "
                                                               "arriving waits for the scanner's resend."),
    allow: List[str] = typer.Option([], "--allow", help="Calling AE title allowed to associate (repeat; default: any)."),
    require_called_ae: bool = typer.Option(False, "--require-called-ae",
                                           help="Reject associations addressed to another AE title than --ae-title."),
    max_associations: int = typer.Option(8, min=1, help="Concurrent associations; more are rejected."),
    timeout: float = typer.Option(60.0, min=1.0, help="DIMSE and network timeout, seconds."),
    results_file: Optional[Path] = typer.Option(None, help="JSON lines, one per study (default STORE/results.jsonl)."),
    webhook: Optional[str] = typer.Option(None, help="URL to POST each study's JSON line to (best effort)."),
    retention_hours: float = typer.Option(24.0, min=0.0, help="Delete received images this long after their result went out."),
    keep_images: bool = typer.Option(False, "--keep-images", help="Never delete received images."),
    min_free_mb: float = typer.Option(1024.0, min=0.0, help="Below this free space, refuse associations (Out of Resources)."),
    retry_base: float = typer.Option(2.0, min=0.01, help="First wait before retrying delivery; doubles per failure."),
    retry_max: float = typer.Option(300.0, min=0.1, help="Longest wait between delivery retries, seconds."),
    metrics_port: Optional[int] = typer.Option(None, min=0, max=65535, help="Serve Prometheus /metrics on this port."),
    tls_cert: Optional[Path] = typer.Option(None, help="TLS: our certificate (PEM); with --tls-key."),
    tls_key: Optional[Path] = typer.Option(None, help="TLS: our private key (PEM)."),
    tls_ca: Optional[Path] = typer.Option(None, help="TLS: require client certificates signed by this CA."),
    processor: str = typer.Option("auto", help="study (series analysis, SR + Secondary Capture) | fallback "
                                               "(per-slice, minimal SR) | auto (study when installed)."),
    plane: str = typer.Option("axial", help="Plane to classify in (study processor): axial | coronal."),
    backend: Optional[str] = typer.Option(None, help="ort | trt (default: from the model file)."),
    log_level: str = typer.Option("info", help="debug | info | warning | error"),
):
    """DICOM Storage SCP: store every CT instance durably, classify each series, send an SR back."""
    from edgekidney.dicomnet import Destination, ListenerConfig, TlsConfig, run

    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together")
    cfg = ListenerConfig(
        store=store, ae_title=ae_title, host=host, port=port, allowed_calling=tuple(allow),
        require_called_ae=require_called_ae,
        max_associations=max_associations, dimse_timeout_s=timeout, network_timeout_s=timeout,
        series_timeout_s=series_timeout, restart_grace_s=restart_grace,
        destination=Destination.parse(destination) if destination else None,
        results_file=results_file, webhook=webhook, retention_s=None if keep_images else retention_hours * 3600.0,
        min_free_mb=min_free_mb, retry_base_s=retry_base, retry_max_s=retry_max, metrics_port=metrics_port,
        tls=TlsConfig(tls_cert, tls_key, tls_ca) if tls_cert else None)
    run(cfg, resolve_model(model), log_level=log_level, processor=processor, plane=plane, backend=backend)


METAVARS = {"int": "N", "integer": "N", "float": "X", "path": "PATH", "str": "TEXT", "text": "TEXT"}


def _type_word(command, param) -> str:
    """First word of the option's value type: recent typers say it through ``display_type``
    ("<int range>"), older ones and click through ``param.type.name`` ("integer range")."""
    if hasattr(param, "display_type"):
        text = param.display_type(command.context_class(command))  # typer's own click or click itself
    else:
        text = str(getattr(getattr(param, "type", None), "name", "") or "")
    words = text.strip("<>").split()
    return words[0] if words else "text"


def build_cli(command=None):
    """The click command behind ``app`` with plain metavars (``--threads N``, not ``<int range>``)."""
    command = command or typer.main.get_command(app)
    for param in command.params:
        if param.param_type_name == "option" and not param.is_flag and param.metavar is None:
            kind = _type_word(command, param)
            param.metavar = METAVARS.get(kind, kind.upper())
        elif param.param_type_name == "argument" and param.metavar is None:
            param.metavar = param.name.upper()
    for sub in getattr(command, "commands", {}).values():
        build_cli(sub)
    return command


def main() -> None:
    build_cli()(prog_name="edgekidney")


if __name__ == "__main__":
    main()
