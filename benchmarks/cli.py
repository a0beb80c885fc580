"""CLI start-up: `toolkit --help`, each command's --help and an argument error, against importing TensorFlow.

    python benchmarks/cli.py [--rounds 5]

Each command runs as a fresh process (the installed `toolkit` console script beside this Python);
the table gives the median wall time over the rounds and the ratio to `python -c "import
tensorflow"`, which is what every one of them paid before the CLI stopped importing it up front.
Target: every row under 1.5 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOOLKIT = str(Path(sys.executable).with_name("toolkit"))
COMMANDS = {
    "toolkit --help": [TOOLKIT, "--help"],
    "toolkit finetune --help": [TOOLKIT, "finetune", "--help"],
    "toolkit predict --help": [TOOLKIT, "predict", "--help"],
    "toolkit inspect --help": [TOOLKIT, "inspect", "--help"],
    "toolkit finetune --head-epoks 3 (error)": [TOOLKIT, "finetune", "--data", "x", "--head-epoks", "3"],
    'python -c "import tensorflow"': [sys.executable, "-c", "import tensorflow"],
}


def wall(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    return time.perf_counter() - start, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    chatter: dict[str, bool] = {}
    for _ in range(args.rounds):  # interleaved, so load on the machine hits every row alike
        for name, argv in COMMANDS.items():
            seconds, stderr = wall(argv)
            times[name].append(seconds)
            chatter[name] = chatter.get(name, False) or any(m in stderr for m in ("I0000", "oneDNN", "cuda"))
    reference = statistics.median(times['python -c "import tensorflow"'])
    print(f"| command | median s ({args.rounds} runs) | vs importing TensorFlow | TensorFlow log lines |")
    print("|---|---:|---:|---|")
    for name in COMMANDS:
        median = statistics.median(times[name])
        print(f"| `{name}` | {median:.2f} | {median / reference:.2f}x | {'yes' if chatter[name] else 'none'} |")


if __name__ == "__main__":
    import publish

    publish.run(main, "cli")
