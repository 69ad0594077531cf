"""python -m mlx_flash.probe disk|window|matmul: the disk probe (paper Fig. 2b), the windowing curve (Fig. 4)
and this device's matmul rates (MLX against numpy: where a prompt's matmuls run).

    python -m mlx_flash.probe disk --model models/smollm2-135m [--chunks 4K:4M] [--threads 1,2,4,8,16,32]
    python -m mlx_flash.probe window --model models/smollm2-135m [--windows 1:10] [--tokens 512]
    python -m mlx_flash.probe matmul [--shape 4096x16384] [--tokens 1,128]

The measurements live in mlx_flash.bench.probe, bench.windowing and bench.matmul.
"""

import argparse
import json
from pathlib import Path

from .bench import matmul, probe, windowing
from .errors import FlashError, cli
from .prepare import model_for


def setup_arg_parser():
    p = argparse.ArgumentParser(prog="python -m mlx_flash.probe",
                                description="Disk probe (paper Fig. 2b), windowing curve (Fig. 4), matmul rates.")
    sub = p.add_subparsers(dest="command", required=True)
    for s in (probe.add_parser(sub), windowing.add_parser(sub)):
        s.add_argument("--json", default=None, help="write the results to this file")
        s.add_argument("--plots", default=None, help="write a PNG into this folder")
        s.add_argument("--quiet", action="store_true", help="no progress bar")
    m = matmul.add_parser(sub)
    m.add_argument("--json", default=None, help="write the results to this file")
    return p


@cli
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if args.command == "matmul":
        r = matmul.run(args)
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=1))
        return r
    args.model = model_for(args.model)  # a built-in name: its converted, calibrated copy
    if not Path(args.model).is_dir():
        raise FlashError(f"{args.model} is not a model folder")
    return (probe if args.command == "disk" else windowing).run(args)


if __name__ == "__main__":
    main()
