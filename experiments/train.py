"""Train a model from a config file:

    python -m experiments.train --config=configs/mqar_gla.py [--workdir=runs/x]
        [--config.train.steps=100 ...]

Rerunning with the same workdir resumes from its last checkpoint. On several hosts, run the
same command on each; `jax.distributed.initialize()` picks the cluster up from the environment
(or pass --coordinator, --num_processes, --process_id).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from seqjax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file in configs/")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "where checkpoints and metrics go (default: runs/<config file name>)"
)
_COORDINATOR = flags.DEFINE_string("coordinator", None, "multi-host: the coordinator's host:port")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: the number of hosts")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this host's index")


def main(argv):
    del argv
    # Orbax logs every save step at INFO; the run's own lines are printed.
    logging.set_verbosity(logging.WARNING)
    if _COORDINATOR.value or _NUM_PROCESSES.value:
        jax.distributed.initialize(
            _COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
        )
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/mqar_gla.py")
    workdir = _WORKDIR.value or str(Path("runs") / Path(flags.FLAGS["config"].config_filename).stem)
    summary = train(_CONFIG.value, workdir)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
