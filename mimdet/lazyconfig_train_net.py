"""The seed's `python lazyconfig_train_net.py --config-file configs/benchmarking/NAME.py --num-gpus G --num-machines M
[--machine-rank R] [--dist-url tcp://HOST:PORT] [--resume] [--eval-only] [KEY=VALUE ...]`, run by mcbeit-det (see
`mcbeit-det train --help`; the configs are presets of mcbeit.config.detection)."""
import os
import sys

from mcbeit.cli.detection import main_lazyconfig

if __name__ == "__main__":
    sys.exit(main_lazyconfig(script=os.path.abspath(__file__)))
