"""Run under a launcher (torchrun, several processes): trains each run given as a JSON list of
override lists, one after the other in these processes, so that one launch covers many cases.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/training/train_worker.py RUNS.json
"""

import json
import sys


def main(path: str) -> None:
    from accelerate.state import AcceleratorState

    from finetune.config.compose import compose
    from finetune.training.loop import train

    for overrides in json.loads(open(path).read()):
        train(compose(overrides), overrides, quiet=True)
        AcceleratorState._reset_state()  # the next run chooses its own settings


if __name__ == "__main__":
    main(sys.argv[1])
