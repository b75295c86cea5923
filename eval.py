"""Evaluate a checkpoint: `python eval.py ckpt=<run>/checkpoints/best.pt [key=value ...]`.

The model, activation and task are rebuilt from the config stored in the checkpoint; each
key=value changes that stored config, with train.py's keys and syntax (e.g. data.root=/path,
trainer.device=cpu, trainer.limit_val_batches=10, data=coco). The whole validation set is scored
unless trainer.limit_val_batches is given. Prints the metrics once as a JSON line and writes them
to <run>/eval_<checkpoint>.json (eval_best.json, eval_last.json); nothing else is written. `python eval.py --help` lists the options.
"""
from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from engine.evaluate import USAGE

    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr)
    from engine.errors import exit_on_user_error
    from engine.evaluate import evaluate_checkpoint

    with exit_on_user_error():
        evaluate_checkpoint(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
