"""The ``toolkit`` command (:mod:`~toolkit.cli.main`): argparse sub-commands generated from the settings' own
declarations (:mod:`~toolkit.cli.flags`), over the Python API (:mod:`toolkit.api`). Only this package configures
logging and output."""
