"""TTA, ensembling and calibration on clothing-small/test, measured in one run.

    python benchmarks/ensemble.py [--members mobilenet_v2,efficientnet_lite0,efficientnet_lite2] [--freeze all]

Trains the members with `toolkit finetune --ensemble` on clothing-small/train (validation/ for early
stopping and the temperature fit), then on the 372 test images reports: each member's accuracy
(centre crop and 10-crop), the ensemble's (centre crop and 10-crop), and the
expected calibration error of each member before and after temperature scaling. `--freeze all`
(head only) keeps this to minutes on 2 CPU cores; pass `--freeze auto` for the full recipe.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "datasets" / "clothing-small"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", default="mobilenet_v2,efficientnet_lite0,efficientnet_lite2")
    parser.add_argument("--freeze", default="all")
    args = parser.parse_args()

    import numpy as np

    from toolkit.config.recipes import build_config
    from toolkit.data.datasets import load_splits
    from toolkit.predict.calibration import expected_calibration_error
    from toolkit.predict.inference import predict_ensemble, predict_member
    from toolkit.predict.members import load_models
    from toolkit.train.ensemble import finetune_ensemble

    out = Path(tempfile.mkdtemp(prefix="bench-ensemble-")) / "ensemble"
    config = build_config(None, {"data": str(DATA), "freeze": args.freeze})
    finetune_ensemble(config, args.members, out=out, verbose=0)
    test = load_splits(DATA).test
    labels = np.asarray(test.labels)
    members = load_models([out])

    def acc(p):
        return float((p.argmax(1) == labels).mean())

    rows = []
    centre = {}
    for m in members:
        calibrated = predict_member(m, test.decode_paths, test.is_jpeg)
        temperature, m.temperature = m.temperature, 1.0
        raw = predict_member(m, test.decode_paths, test.is_jpeg)
        m.temperature = temperature
        centre[m.path.name] = acc(calibrated)
        rows.append((m.path.name, acc(calibrated), expected_calibration_error(raw, labels),
                     expected_calibration_error(calibrated, labels), temperature))
    ten = {m.path.name: acc(predict_member(m, test.decode_paths, test.is_jpeg, "10crop")) for m in members}
    ens_centre = acc(predict_ensemble(members, test.decode_paths, test.is_jpeg))
    ens_ten = acc(predict_ensemble(members, test.decode_paths, test.is_jpeg, "10crop"))

    print(f"clothing-small test ({len(labels)} images), members trained with --freeze {args.freeze}")
    print(f"{'member':<34}{'accuracy':>9}{'ECE raw':>9}{'ECE T':>8}{'T':>7}")
    for name, a, e0, e1, t in rows:
        print(f"{name:<34}{a:>9.4f}{e0:>9.4f}{e1:>8.4f}{t:>7.2f}")
    best = max(centre.values())
    for name, a in ten.items():
        print(f"{name + ' 10-crop':<34}{a:>9.4f}   ({100 * (a - centre[name]):+.1f} pt vs its centre crop)")
    print(f"{'ensemble, centre crop':<34}{ens_centre:>9.4f}   ({100 * (ens_centre - best):+.1f} pt vs best member)")
    print(f"{'ensemble, 10-crop':<34}{ens_ten:>9.4f}   ({100 * (ens_ten - ens_centre):+.1f} pt vs ensemble centre)")


if __name__ == "__main__":
    import publish

    publish.run(main, "ensemble")
