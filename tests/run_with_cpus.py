"""``toolkit`` in a fresh process whose CPU is split into N logical devices.

``python tests/run_with_cpus.py N finetune ...`` -- how the tests run ``--strategy mirrored`` without
GPUs: the logical devices must be configured before TensorFlow starts, so not inside pytest's process.
"""

import sys

from toolkit.cli.main import main
from toolkit.train import distribute

if __name__ == "__main__":
    distribute.use_logical_cpus(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
