"""Deployment, measured: every export format on clothing-small's test images, and candidate scores for
telling images of unknown classes apart, side by side in one run.

    python benchmarks/deploy.py [--run RUN] [--only formats|unknown|unknown-e2e] [--pairs N] [--backbone NAME] [--json]

``--backbone NAME`` (default: the toolkit's default, mobilenet_v2 at 224 px) applies to every part: the runs
trained (`toolkit finetune --backbone NAME`, at the backbone's own size) and the features scored.

**Formats.**
Trains (or takes ``--run``) `toolkit finetune --data clothing-small --freeze all` (mobilenet_v2, 224 px,
the data's validation/ split), exports it in every format with `toolkit export`, and runs each file in its
own runtime (TensorFlow for the SavedModel, the TFLite interpreter, onnxruntime) on the centre crops of
the 372 test images. Printed per format: accuracy with its 95 % interval, top-1 agreement with the Keras
model and the largest probability difference, file size, and single-thread latency per image (median
of 20, after a warm-up).

**Unknown classes** (which score `predict --unknown` uses, chosen here). mobilenet_v2 pooled
features of each centre crop and its mirror image; 5-fold x 3 fold heads (`toolkit.train.fold_heads`) on the
known classes' training images. Two settings: clothing-small with 2 of its 10 classes (drawn with seed 0)
held out of training, tested on its test images; hymenoptera (train/) with clothing-small's test photos as
the unknowns, tested on val/. Candidates: 1 − max probability, entropy, Mahalanobis distance to the
nearest class mean (shared Ledoit-Wolf covariance), relative Mahalanobis (minus the distance to the
global mean), cosine distance to the 1st and 5th nearest training image, to the 5th nearest training image of
the predicted class (class knn5), energy (minus the log-sum-exp of the heads' logits), sums of two scores each
normalised by the median and IQR of its out-of-fold values, and `max(a, b)`: the larger of two scores each
normalised by its out-of-fold median and median-to-95th-percentile distance (`predict --unknown` ships
`max(1 - max prob, class knn5)`, computed here with `toolkit.predict.unknown`'s own functions). For each: AUROC (known
vs unknown test images, with its 95 % bootstrap interval: `toolkit.core.uncertainty.auroc_interval`), and with the
threshold at the 95th percentile of its out-of-fold values (the `auto` rule: 5 % of known images rejected)
the rejection rate of known test images, of unknown ones, and the accuracy on the accepted known images.
Out-of-fold: probabilities from the heads that never saw the image, feature statistics fitted without the
image's fold, neighbours other than the image itself. With
``--pairs N`` the clothing-small setting is repeated for the first N distinct held-out pairs (seeds 0, 1, ...),
and a summary over the pairs is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "datasets"
FORMATS = ("savedmodel", "tflite", "tflite-fp16", "tflite-int8", "onnx")
TIMED = 20


def toolkit(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "toolkit"), "-q", *args], check=True, cwd=REPO)


def runner(fmt: str, target: Path):
    """A function images -> probabilities for one exported file, in its own runtime, single-threaded."""
    if fmt == "savedmodel":
        import tensorflow as tf

        serve = tf.saved_model.load(str(target)).signatures["serve"]
        return lambda x: next(iter(serve(tf.constant(x)).values())).numpy()
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"image": x})[0]
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(target), num_threads=1)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def run(x):
        rows = []
        for image in x:
            interpreter.set_tensor(inp["index"], image[None])
            interpreter.invoke()
            rows.append(interpreter.get_tensor(out["index"])[0])
        return np.stack(rows)

    return run


def pooled_views(split, backbone_name: str | None = None) -> np.ndarray:
    """(2, images, channels): pooled features of each centre crop and of its mirror image (what `toolkit audit`
    computes), of the default backbone (mobilenet_v2 at 224 px) or ``backbone_name`` at its own size."""
    import dataclasses

    from toolkit import backbones
    from toolkit.config.settings import FinetuneConfig
    from toolkit.train.probe import centre_and_mirror_features

    config = FinetuneConfig()
    if backbone_name:
        config = dataclasses.replace(config, backbone=backbone_name)
    backbone = backbones.create(config.backbone, input_shape=(None, None, 3))
    return centre_and_mirror_features(backbone, split, config, 0).reshape(2, len(split), -1)


def class_statistics(features: np.ndarray, labels: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(class means, shared Ledoit-Wolf precision) of pooled features (an earlier --unknown score, kept for comparison)."""
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, np.float64)
    means = np.stack([features[labels == c].mean(0) for c in range(classes)])
    return means, LedoitWolf().fit(features - means[labels]).precision_


def mahalanobis_to_nearest(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row of ``features`` to the nearest of ``means``."""
    features = np.asarray(features, np.float64)
    # (d @ P) * d summed by rows: a BLAS product (a three-operand einsum is a plain loop: 30x slower at 1280 features)
    return np.stack([np.sum(((features - m) @ precision) * (features - m), axis=1) for m in means], 1).min(1)


class FeatureScores:
    """Feature-space scores fitted on training features ``bank`` with labels ``y``."""

    def __init__(self, bank: np.ndarray, y: np.ndarray):
        from sklearn.covariance import LedoitWolf
        from sklearn.neighbors import NearestNeighbors

        from toolkit.predict.unknown import unit_features

        self.means, self.precision = class_statistics(bank, y, int(y.max()) + 1)
        self.centre = bank.mean(0)
        self.global_precision = LedoitWolf().fit(bank).precision_
        self.unit = unit_features(bank).astype(np.float16)  # what --unknown stores
        self.neighbours = NearestNeighbors(n_neighbors=2, metric="cosine").fit(self.unit.astype(np.float32))

    def __call__(self, f: np.ndarray, exclude_self: bool = False) -> dict[str, np.ndarray]:
        from toolkit.predict.unknown import neighbour_distance, unit_features

        d = mahalanobis_to_nearest(f, self.means, self.precision)
        g = mahalanobis_to_nearest(f, self.centre[None], self.global_precision)
        dist, _ = self.neighbours.kneighbors(unit_features(f))
        return {"mahalanobis": d, "relative mahalanobis": d - g, "knn1": dist[:, 1 if exclude_self else 0],
                "knn5": neighbour_distance(f, self.unit, leave_one_out=exclude_self)}  # an earlier score, kept for comparison


def probability_scores(p: np.ndarray) -> dict[str, np.ndarray]:
    return {"1 - max prob": 1 - p.max(1), "entropy": -(p * np.log(np.clip(p, 1e-12, 1))).sum(1)}


def unknown_setting(name: str, views: np.ndarray, y_train, known_views: np.ndarray, y_known, unknown_views: np.ndarray,
                    classes: int) -> list[dict]:
    """Every candidate score in one setting, from :func:`pooled_views` of the training, known and unknown test images."""
    import keras
    from scipy.special import logsumexp

    from toolkit.backbones.head import FoldHeads
    from toolkit.core.uncertainty import auroc, auroc_interval
    from toolkit.predict.unknown import class_neighbour_distance, combined, tail_scale
    from toolkit.train.fold_heads import FoldSettings, fit_fold_heads, per_head_probabilities
    from toolkit.train.folds import assign_folds, held_out, out_of_fold

    table = assign_folds(y_train, 5, 0, 3)
    held = held_out(table, 5)
    keras.utils.set_random_seed(0)
    heads = FoldHeads(held.shape[1], classes)
    per_head = fit_fold_heads(heads, views[:, :, None, None, :], y_train, held, FoldSettings())
    model = heads.on_features((1, 1, views.shape[-1]))

    def probs(v):
        return per_head_probabilities(model, v.mean(0)[:, None, None, :].astype(np.float32), 32).mean(1)

    bank = views.mean(0)
    # out-of-fold reference: statistics without the image's fold (first repeat), neighbours other than itself
    reference = {**probability_scores(out_of_fold(per_head, held)), **{k: np.zeros(len(bank)) for k in
                                                                      ("mahalanobis", "relative mahalanobis")}}
    for k in range(5):
        inside = table[:, 0] == k
        part = FeatureScores(bank[~inside], y_train[~inside])(bank[inside])
        for key in ("mahalanobis", "relative mahalanobis"):
            reference[key][inside] = part[key]
    scorer = FeatureScores(bank, y_train)
    reference.update({k: v for k, v in scorer(bank, exclude_self=True).items() if k.startswith("knn")})
    p_known, p_unknown = probs(known_views), probs(unknown_views)
    s_known = {**probability_scores(p_known), **scorer(known_views.mean(0))}
    s_unknown = {**probability_scores(p_unknown), **scorer(unknown_views.mean(0))}
    features_in = keras.Input(shape=(1, 1, views.shape[-1]))
    logits = keras.Model(features_in, heads.fold_logits(features_in))

    def energy(v):  # (images, heads): minus the log-sum-exp of each head's logits
        z = per_head_probabilities(logits, v.mean(0)[:, None, None, :].astype(np.float32), 32)
        return -logsumexp(z, axis=2)

    reference["energy"] = out_of_fold(energy(views)[:, :, None], held)[:, 0]
    s_known["energy"], s_unknown["energy"] = energy(known_views).mean(1), energy(unknown_views).mean(1)
    oof_predicted = out_of_fold(per_head, held).argmax(1)
    reference["class knn5"] = class_neighbour_distance(bank, oof_predicted, scorer.unit, y_train,
                                                       own_labels=y_train)
    for scores, p, v in ((s_known, p_known, known_views), (s_unknown, p_unknown, unknown_views)):
        scores["class knn5"] = class_neighbour_distance(v.mean(0), p.argmax(1), scorer.unit, y_train)

    def normalised(scores, key):
        q1, median, q3 = np.percentile(reference[key], [25, 50, 75])
        return (scores[key] - median) / max(q3 - q1, 1e-12)

    for a, b in (("1 - max prob", "mahalanobis"), ("1 - max prob", "knn5"), ("1 - max prob", "relative mahalanobis"),
                 ("entropy", "knn5")):
        key = f"{a} + {b}"
        reference[key] = normalised(reference, a) + normalised(reference, b)
        s_known[key] = normalised(s_known, a) + normalised(s_known, b)
        s_unknown[key] = normalised(s_unknown, a) + normalised(s_unknown, b)
    for a, b in (("1 - max prob", "mahalanobis"), ("1 - max prob", "knn5"), ("1 - max prob", "class knn5"),
                 ("energy", "knn5"), ("energy", "class knn5")):  # the rule shipped (toolkit.predict.unknown): the third
        key, spread = f"max({a}, {b})", np.array([tail_scale(reference[a]), tail_scale(reference[b])])
        for scores in (reference, s_known, s_unknown):
            scores[key] = combined((scores[a], scores[b]), spread)
    rows = []
    for key in s_known:
        threshold = np.percentile(reference[key], 95)
        accepted = s_known[key] <= threshold
        rows.append({"setting": name, "score": key, "auroc": float(auroc(s_known[key], s_unknown[key])),
                     "auroc_ci95": auroc_interval(s_known[key], s_unknown[key]),
                     "known_rejected": float(1 - accepted.mean()),
                     "unknown_rejected": float((s_unknown[key] > threshold).mean()),
                     "accepted_accuracy": float((p_known.argmax(1)[accepted] == y_known[accepted]).mean()),
                     "accuracy": float((p_known.argmax(1) == y_known).mean()), "known": len(y_known),
                     "unknown": len(s_unknown[key])})
    return rows


def unknown_scores(pairs: int = 1, backbone: str | None = None) -> list[dict]:
    """Both settings; with ``pairs`` > 1, clothing-small once per held-out pair (drawn with seeds 0, 1, ...) and
    a summary over the pairs."""
    from toolkit.data.datasets import load_splits

    clothing, hymenoptera = load_splits(SHARED / "clothing-small"), load_splits(SHARED / "hymenoptera")
    c_train, c_test = pooled_views(clothing.train, backbone), pooled_views(clothing.test, backbone)
    y_train, y_test = np.array(clothing.train.labels), np.array(clothing.test.labels)
    rows, drawn = [], []
    for seed in range(1000):
        held_classes = sorted(np.random.default_rng(seed).choice(len(clothing.class_names), 2, replace=False).tolist())
        if held_classes in drawn:
            continue
        drawn.append(held_classes)
        keep = np.isin(np.arange(len(clothing.class_names)), held_classes, invert=True)
        index = np.cumsum(keep) - 1  # old class -> new class among the kept ones
        known, train = keep[y_test], keep[y_train]
        name = f"clothing-small, {', '.join(clothing.class_names[c] for c in held_classes)} held out"
        rows += unknown_setting(name, c_train[:, train], index[y_train[train]], c_test[:, known], index[y_test[known]],
                                c_test[:, ~known], int(keep.sum()))
        if len(drawn) == pairs:
            break
    rows += unknown_setting("hymenoptera, clothing-small photos as unknowns", pooled_views(hymenoptera.train, backbone),
                            np.array(hymenoptera.train.labels), pooled_views(hymenoptera.val, backbone),
                            np.array(hymenoptera.val.labels), c_test, 2)
    print("\n| setting | score | AUROC (95% CI) | known rejected at auto | unknown rejected at auto | accepted accuracy "
          "(all known) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} ({r['known']} known, {r['unknown']} unknown) | {r['score']} | {with_interval(r['auroc'], r['auroc_ci95'])} | "
              f"{r['known_rejected']:.3f} | {r['unknown_rejected']:.3f} | {r['accepted_accuracy']:.4f} "
              f"({r['accuracy']:.4f}) |")
    if pairs > 1:
        print(f"\nOver the {len(drawn)} held-out pairs of clothing-small:\n\n| score | AUROC mean ± sd | min | max | "
              "pairs with AUROC >= 0.90 | known rejected at auto (mean) | unknown rejected at auto (mean) |\n"
              "|---|---|---|---|---|---|---|")
        clothing_rows = [r for r in rows if r["setting"].startswith("clothing")]
        for score in dict.fromkeys(r["score"] for r in clothing_rows):
            auroc = np.array([r["auroc"] for r in clothing_rows if r["score"] == score])
            rejected, caught = (np.mean([r[key] for r in clothing_rows if r["score"] == score])
                                for key in ("known_rejected", "unknown_rejected"))
            print(f"| {score} | {auroc.mean():.3f} ± {auroc.std(ddof=1):.3f} | {auroc.min():.3f} | {auroc.max():.3f} | "
                  f"{(auroc >= 0.9).sum()}/{len(auroc)} | {rejected:.3f} | {caught:.3f} |")
    return rows


def unknown_end_to_end(backbone: str | None = None) -> None:
    """The shipped `predict --unknown auto`, end to end: runs trained by `toolkit finetune --freeze all` on
    clothing-small without shoes and shorts (its validation/ split, linked into a temporary folder) and on
    hymenoptera; predicted on clothing's test/ and on hymenoptera's val/ plus clothing's test photos."""
    import pandas as pd

    from toolkit.core.uncertainty import auroc, auroc_interval

    clothing, hymenoptera, held = SHARED / "clothing-small", SHARED / "hymenoptera", ("shoes", "shorts")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "clothing-8"
        for split in ("train", "validation"):
            for folder in (clothing / split).iterdir():
                if folder.is_dir() and folder.name not in held:
                    (data / split / folder.name).mkdir(parents=True)
                    for f in folder.iterdir():
                        (data / split / folder.name / f.name).symlink_to(f)
        print("\n| setting (shipped `predict --unknown auto`) | AUROC (95% CI) | known rejected | unknown rejected | accepted "
              "accuracy (all known) |\n|---|---|---|---|---|")
        for name, train, images, is_unknown in (
                (f"clothing-small, {', '.join(held)} held out", data, [clothing / "test"], lambda p: p.split("/")[-2] in held),
                ("hymenoptera, clothing-small test photos as unknowns", hymenoptera, [hymenoptera / "val", clothing / "test"],
                 lambda p: str(clothing) in p)):
            run, out = Path(tmp) / f"run-{len(name)}", Path(tmp) / f"p-{len(name)}.csv"
            toolkit("finetune", "--data", str(train), "--freeze", "all", "--out", str(run), *backbone_flag(backbone))
            toolkit("predict", "--model", str(run), "--images", *map(str, images), "--unknown", "auto", "--out", str(out))
            frame = pd.read_csv(out)
            unknown = frame["path"].map(is_unknown).to_numpy()
            truth = frame["path"].str.split("/").str[-2].to_numpy()
            rejected = (frame["label"] == "unknown").to_numpy()
            kept = ~unknown & ~rejected
            scores = frame["unknown_score"].to_numpy()
            known_part, unknown_part = scores[~unknown], scores[unknown]
            shown = with_interval(auroc(known_part, unknown_part), auroc_interval(known_part, unknown_part))
            print(f"| {name} | {shown} | {rejected[~unknown].mean():.3f} | "
                  f"{rejected[unknown].mean():.3f} | {(frame['label'].to_numpy()[kept] == truth[kept]).mean():.4f} "
                  f"({(frame['top1_label'].to_numpy()[~unknown] == truth[~unknown]).mean():.4f}) |", flush=True)


def with_interval(value: float, interval: tuple[float, float]) -> str:
    """``0.879 (0.84–0.92)``: an AUROC with its 95 % bootstrap interval (``toolkit.core.uncertainty.auroc_interval``), the
    bounds rounded outwards to 0.01 (so that 0.998 does not read "(1.00–1.00)")."""
    low, high = interval
    return f"{value:.3f} ({np.floor(low * 100 + 1e-9) / 100:.2f}–{np.ceil(high * 100 - 1e-9) / 100:.2f})"


def backbone_flag(backbone: str | None) -> tuple[str, ...]:
    return ("--backbone", backbone) if backbone else ()


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=None, help="a trained run on clothing-small (default: train one)")
    parser.add_argument("--only", choices=("formats", "unknown", "unknown-e2e"), default=None)
    parser.add_argument("--pairs", type=int, default=1, help="--only unknown: held-out class pairs of clothing-small "
                        "(default 1: the pair drawn with seed 0)")
    parser.add_argument("--backbone", default=None, help="the backbone of the runs trained and of the features "
                        "scored (default: the toolkit's default, mobilenet_v2)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"needs the shared datasets at {SHARED}")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)  # the SavedModel's latency on one thread too
    if args.only in (None, "unknown"):
        rows = unknown_scores(args.pairs, args.backbone)
        if args.json:
            print(json.dumps(rows, indent=1))
    if args.only in (None, "unknown-e2e"):
        unknown_end_to_end(args.backbone)
    if args.only in (None, "formats"):
        formats(args)


def formats(args) -> None:
    import tensorflow as tf

    from toolkit.core.uncertainty import accuracy_interval, difference_interval
    from toolkit.data.datasets import load_splits
    from toolkit.data.pipeline import eval_image
    from toolkit.predict.members import load_member

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else Path(tmp) / "run"
        if not args.run:
            start = time.perf_counter()
            toolkit("finetune", "--data", str(SHARED / "clothing-small"), "--freeze", "all", "--out", str(run),
                    *backbone_flag(args.backbone))
            print(f"trained in {time.perf_counter() - start:.0f} s")
        member = load_member(run)
        test = load_splits(SHARED / "clothing-small").test
        x = np.stack([eval_image(tf.io.read_file(p), j, member.image_size, member.crop_fraction).numpy()
                      for p, j in zip(test.decode_paths, test.is_jpeg)]).astype(np.float32)
        labels = np.asarray(test.labels)
        keras_probs = np.concatenate([np.asarray(member.model(x[i:i + 32], training=False)) for i in range(0, len(x), 32)])
        from toolkit.predict.calibration import apply_temperature

        keras_probs = apply_temperature(keras_probs, member.temperature)
        keras_correct = keras_probs.argmax(1) == labels
        rows = []
        for fmt in FORMATS:
            out = Path(tmp) / fmt
            toolkit("export", "--model", str(run), "--format", fmt, "--out", str(out), "--data",
                    str(SHARED / "clothing-small"))
            target = next(p for p in out.iterdir() if p.name.startswith(("model", "savedmodel")))
            run_file = runner(fmt, target)
            probs = np.concatenate([run_file(x[i:i + 32]) for i in range(0, len(x), 32)])
            times = []
            for image in x[: TIMED + 1]:
                start = time.perf_counter()
                run_file(image[None])
                times.append(time.perf_counter() - start)
            correct = probs.argmax(1) == labels
            low, high = accuracy_interval(int(correct.sum()), len(labels))
            rows.append({"format": fmt, "accuracy": float(correct.mean()), "ci95": [low, high],
                         "below_keras": float(keras_correct.mean() - correct.mean()),
                         "below_keras_ci95": difference_interval(keras_correct, correct),
                         "agreement": float((probs.argmax(1) == keras_probs.argmax(1)).mean()),
                         "max_diff": float(np.abs(probs - keras_probs).max()), "bytes": size_of(target),
                         "ms": float(np.median(times[1:]) * 1000)})
        print(f"\nKeras model: accuracy {keras_correct.mean():.4f} on {len(labels)} test images\n")
        print("| format | accuracy (95% CI) | points below Keras (paired 95% CI) | top-1 agreement with Keras | "
              "max prob. difference | size (MB) | ms per image (1 thread) |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            below = " to ".join(f"{100 * v:.1f}" for v in r["below_keras_ci95"])
            print(f"| {r['format']} | {r['accuracy']:.4f} ({r['ci95'][0]:.2f}–{r['ci95'][1]:.2f}) | "
                  f"{100 * r['below_keras']:.1f} ({below}) | {r['agreement']:.4f} | "
                  f"{r['max_diff']:.2g} | {r['bytes'] / 1e6:.1f} | {r['ms']:.1f} |")
        if args.json:
            print(json.dumps(rows, indent=1))


def deploy_page(args: list[str]) -> str:
    """The docs page of what ran: deploy-formats, deploy-unknown, deploy-unknown-e2e, or deploy-all."""
    for i, arg in enumerate(args):
        if arg.startswith("--only="):
            return "deploy-" + arg.split("=", 1)[1]
        if arg == "--only" and i + 1 < len(args):
            return "deploy-" + args[i + 1]
    return "deploy-all"


if __name__ == "__main__":
    import publish

    publish.run(main, deploy_page)
