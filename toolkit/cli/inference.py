"""The ``toolkit`` commands that use trained runs: predict, embed, evaluate, explain, export, and audit."""

from __future__ import annotations

import argparse
from pathlib import Path

from toolkit.cli.flags import subcommand

TTA_CHOICES = ("none", "flip", "5crop", "10crop", "full")  # toolkit.predict.inference.TTA_MODES, without importing it


def _model_args(p: argparse.ArgumentParser, many: bool = True) -> None:
    if many:
        p.add_argument("--model", action="append", required=True, metavar="RUN",
                       help="run folder or ensemble folder; repeat for an ensemble (mean of probabilities)")
        p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per --model (default equal)")
        p.add_argument("--tta", default="none", choices=TTA_CHOICES,
                       help="test-time augmentation: centre crop only, + mirror, 4 corners + centre, those + mirrors, "
                       "or the whole image through the fully convolutional network")
        p.add_argument("--batch-size", type=int, default=32, help="images (times views) per forward pass")
    else:
        p.add_argument("--model", required=True, metavar="RUN", help="run folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _cmd_predict(args: argparse.Namespace) -> int:
    """Predict the class of every image given (files, folders searched recursively, or CSVs with a path
    column) with one model or an ensemble, optionally with test-time augmentation. Writes a CSV: path,
    label, probability, top-k labels and probabilities (all class probabilities with --all-probs), and
    an error column for unreadable files, which get a row saying why. A multi-label run writes path, labels
    (every label at or above its threshold, joined by ';'), prob_<class> for every class, and error; its
    views keep the whole image (--tta none, flip or full)."""
    from toolkit.api.run import predict
    from toolkit.core import outputs, runs

    out = outputs.check_output_file(args.out, args.overwrite, {"--model": args.model, "--images": args.images})
    result = predict(args.model, args.images, weights=args.weights, tta=args.tta, batch_size=args.batch_size,
                     top_k=args.top_k, all_probs=args.all_probs, unknown=args.unknown, verbose=0 if args.quiet else 1)
    runs.write_text(out, result.frame.to_csv(index=False))
    rejected = f", {result.unknown} labelled unknown" if result.unknown is not None else ""
    from toolkit.core.uncertainty import plural

    print(f"{plural(result.predicted, 'image')} predicted{rejected}, {result.unreadable} unreadable (rows say why); "
          f"written to {out}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    """Write each image's pooled backbone features (an embedding for similarity search, clustering or
    de-duplication), from a trained run (--model: its fine-tuned backbone) or a backbone with its own pretrained
    weights (--backbone). One row per image: path, error (why an unreadable file has none), feature_0 ...; Parquet,
    .npz or CSV by --out's suffix. The views are predict's; with --tta none an image's features are the run's
    cached centre-crop features."""
    from toolkit.api.run import embed
    from toolkit.core import outputs
    from toolkit.predict.embed import check_format, write, written_by_toolkit

    check_format(args.out)
    inputs = {"--images": args.images} | ({"--model": [args.model]} if args.model else {})
    out = outputs.check_output_file(args.out, args.overwrite, inputs, written_by_toolkit=written_by_toolkit)
    frame = embed(args.images, model=args.model, backbone=args.backbone, preprocess=args.backbone_preprocess,
                  tta=args.tta, batch_size=args.batch_size, verbose=0 if args.quiet else 1)
    write(frame, out)
    from toolkit.core.uncertainty import plural

    unreadable = int((frame["error"] != "").sum())
    print(f"{plural(len(frame) - unreadable, 'image')} embedded ({frame.shape[1] - 2} features each), {unreadable} "
          f"unreadable (rows say why); written to {out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate one model or an ensemble on labelled data: DATA's test/ split if it has one, else its
    validation split, else every image. Writes metrics.json (accuracy, top-5 with 5+ classes, per-class
    precision/recall/F1, confusion matrix, ECE, NLL), confusion_matrix.csv/.png, predictions.csv and
    mistakes.png (the most confident mistakes) into --out. A multi-label run is evaluated on a manifest with a
    labels column: macro and micro mAP, per-label precision/recall/F1 at the run's thresholds, exact match and
    Jaccard (metrics.json, per_label.csv, predictions.csv, report.html)."""
    from toolkit.api.run import evaluate

    m = evaluate(args.model, args.data, args.out, weights=args.weights, tta=args.tta, unknown=args.unknown,
                 batch_size=args.batch_size, overwrite=args.overwrite, verbose=0 if args.quiet else 1)
    which = {"test": "test images", "validation": "validation images", "all": "images (all of --data)"}[m["split"]]
    if m.get("multi_label"):
        low, high = m["macro_ap_interval"]
        print(f"macro mAP {m['macro_ap']:.4f} (95% CI {low:.2f}–{high:.2f}), micro mAP {m['micro_ap']:.4f}, exact "
              f"match {m['exact_match']:.4f}, Jaccard {m['jaccard']:.4f} on {m['images']} {which}; written to {args.out}")
        return 0
    top5 = f", top-5 {m['top5_accuracy']:.4f}" if "top5_accuracy" in m else ""
    low, high = m["accuracy_ci95"]
    print(f"accuracy {m['accuracy']:.4f} (95% CI {low:.2f}–{high:.2f}){top5}, macro F1 {m['macro_f1']:.4f}, "
          f"ECE {m['ece']:.4f} on {m['n']} {which}; written to {args.out}")
    if "unknown" in m:
        u = m["unknown"]
        low, high = u["accepted_accuracy_ci95"]
        print(f"--unknown: {u['n_rejected']} of {m['n']} images ({u['rejected']:.1%}) rejected as unknown (target "
              f"{u['target_rejection']:.0%} of known-class images); accuracy on the {u['n_accepted']} accepted: "
              f"{u['accepted_accuracy']:.4f} (95% CI {low:.2f}–{high:.2f})")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    """Write, per image, the class-activation map of the NIN head's per-class 1x1 conv maps, for the
    predicted class or --class, upsampled and overlaid on the image (PNG)."""
    from toolkit.api.run import explain

    written = explain(args.model, args.images, args.out, class_name=args.class_name, overwrite=args.overwrite)
    from toolkit.core.uncertainty import plural

    print(f"{plural(len(written), 'class-activation map')} written to {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """Export a run's model. Every format takes raw RGB float32 in [0, 255], shape (batch, size, size, 3),
    and returns class probabilities with the run's temperature applied (what `toolkit predict` gives for the
    centre crop); classes.json is written beside it."""
    from toolkit.api.run import export

    target = export(args.model, args.format, args.out, image_size=args.image_size, data=args.data,
                    overwrite=args.overwrite)
    print(f"exported {args.format}: {target}")
    report = target.parent / "export.json"
    if args.format.startswith("tflite-") and report.is_file():
        import json

        r = json.loads(report.read_text())
        from toolkit.core.uncertainty import describe_change, plural

        kind = args.format.split("-", 1)[1]
        print(f"{kind} accuracy {r[kind + '_accuracy']:.4f} vs float {r['float_accuracy']:.4f} on "
              f"{plural(r['images'], 'image')} of {r['measured_on']}: "
              f"{describe_change(r['accuracy_drop'], r['accuracy_drop_ci95'])}; top-1 agreement "
              f"{r['top1_agreement']:.4f}; {r['size_ratio']:.2f}x the float file, {r[kind + '_latency_ms']:.1f} vs "
              f"{r['float_latency_ms']:.1f} ms per image on 1 thread")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    """Give every label a second look: every labelled image of --data (all splits) is scored by fold heads that
    did not train on it, and cleanlab finds label issues, near-duplicates (across splits: leakage) and
    outliers. Writes audit.csv (most suspicious first), report.html and audit.png (the top findings), audit-manifest.csv
    (path,label,split with the suggested labels applied: review it, then `toolkit finetune --data` it) and
    audit.json into --out. No trained model needed: the out-of-fold probabilities of several backbones' features
    are averaged (--backbones); --model RUN uses that run's backbone and image size alone."""
    from toolkit.api.audit import audit

    probes = [name.strip() for name in args.backbones.split(",") if name.strip()] if args.backbones else None
    summary = audit(args.data, args.out, model=args.model, backbones=probes, folds=args.folds, overwrite=args.overwrite,
                    verbose=0 if args.quiet else 1)
    from toolkit.core.uncertainty import plural

    f = summary["findings"]
    print(f"{plural(summary['images'], 'image')} audited: {plural(f['label'], 'label issue')}, "
          f"{plural(f['near_duplicate'], 'near-duplicate pair')} ({summary['near_duplicates_across_splits']} across "
          f"splits), {plural(f['outlier'], 'outlier')}; every finding in {Path(args.out) / 'audit.csv'} (most "
          f"suspicious first), the top ones in {Path(args.out) / 'report.html'}")
    return 0


def _unknown_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unknown", default="off", metavar="auto|off|F", help="score how unlike the training classes each "
                   "image is (unknown_score column; docs/guide/prediction.md) and label it 'unknown' above a threshold "
                   "that rejects a fraction F in (0, 1) of held-out images of the known classes (auto: 0.05)")


def add_inference_commands(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "predict", _cmd_predict, "predict classes of new images, to CSV")
    p.add_argument("--images", nargs="+", required=True, help="image files, folders, or CSVs with a 'path' column")
    _model_args(p)
    p.add_argument("--top-k", type=int, default=3, help="how many top classes to list")
    p.add_argument("--all-probs", action="store_true", help="also a prob_<class> column for every class")
    p.add_argument("--out", default="predictions.csv", help="CSV to write")
    _unknown_arg(p)

    p = subcommand(sub, "embed", _cmd_embed, "pooled backbone features of images (embeddings), to Parquet/npz/CSV")
    p.add_argument("--images", nargs="+", required=True, help="image files, folders, or CSVs with a 'path' column")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="RUN", help="a trained run folder: its fine-tuned backbone")
    source.add_argument("--backbone", metavar="SPEC", help="a backbone with its own pretrained weights: a registry "
                        "name, keras_hub:<preset>, a keras-hub preset folder or a .keras file")
    p.add_argument("--backbone-preprocess", default="auto", help="how a --backbone file expects its pixels (finetune's "
                   "--backbone-preprocess)")
    p.add_argument("--tta", default="none", choices=TTA_CHOICES,
                   help="the views whose features are averaged (predict's)")
    p.add_argument("--batch-size", type=int, default=32, help="images (times views) per forward pass")
    p.add_argument("--out", default="embeddings.parquet", help="file to write: .parquet, .npz or .csv")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = subcommand(sub, "evaluate", _cmd_evaluate,
                   "accuracy, per-class metrics, confusion matrix, calibration, mistakes")
    p.add_argument("--data", required=True, help="dataset folder or CSV manifest")
    _model_args(p)
    p.add_argument("--out", required=True, help="output folder")
    _unknown_arg(p)

    p = subcommand(sub, "explain", _cmd_explain, "class-activation maps overlaid on images")
    p.add_argument("--images", nargs="+", required=True, help="image files, folders, or CSVs with a 'path' column")
    _model_args(p, many=False)
    p.add_argument("--class", dest="class_name", default=None, help="class to explain (default: the predicted one)")
    p.add_argument("--out", required=True, help="output folder")

    p = subcommand(sub, "export", _cmd_export, "export a model as SavedModel, TFLite or ONNX")
    _model_args(p, many=False)
    p.add_argument("--format", required=True, choices=("savedmodel", "tflite", "tflite-fp16", "tflite-int8", "onnx"),
                   help="tflite-int8: full-integer quantization calibrated on the run's training images; tflite-fp16: "
                   "float16 weights. Both write export.json: accuracy of the float and the quantized model, their "
                   "agreement, sizes and single-thread latency")
    p.add_argument("--data", default=None, help="labelled images the quantized formats measure themselves on (default: "
                   "the run's validation split)")
    p.add_argument("--image-size", type=int, default=None, help="input size of the exported model (default: the "
                   "run's); the classifier is fully convolutional")
    p.add_argument("--out", required=True, help="output folder")

    p = subcommand(sub, "audit", _cmd_audit, "find label issues, near-duplicates and outliers in a dataset")
    p.add_argument("--data", required=True, help="dataset folder or CSV manifest")
    p.add_argument("--model", default=None, metavar="RUN", help="use this run's backbone and image size alone")
    p.add_argument("--backbones", default=None, metavar="NAME[,NAME...]", help="the probe backbones whose out-of-fold "
                   "probabilities are averaged (default: mobilenet_v2,efficientnet_lite0,efficientnet_lite2; one name "
                   "is faster)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds for the out-of-fold scores (>= 2)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier audit folder")
