"""What Gantry's own observability costs a run: TensorBoard event logs on and off.

One rank (`worker --standalone`, one thread), the MLP GAN at batch 64, logging every 10 steps
and a sample grid every 500 (as a user's run does, unlike compare.py, which logs twice), the
two settings alternating, medians of the repetitions. Gantry only: the PyTorch reference has
no such logs.
"""

import argparse
import os
import statistics
import sys

from compare import REPO, machine, run_gantry


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=os.path.join(REPO, "target", "release", "worker"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    warmup = 20
    usual = ["train.log_every=10", "samples.every=500"]
    settings = {"on": "logging.tensorboard=true", "off": "logging.tensorboard=false"}
    runs = {name: [] for name in settings}
    for rep in range(args.reps):
        order = list(settings) if rep % 2 == 0 else list(reversed(list(settings)))
        for name in order:
            r = run_gantry(args.worker, 1, args.batch, args.steps, warmup,
                           extra_sets=usual + [settings[name]])
            runs[name].append(r["images_per_second"])
            print(f"rep {rep + 1}/{args.reps} tensorboard {name}: "
                  f"{r['images_per_second']:.0f} images/s", file=sys.stderr, flush=True)

    on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
    print(f"machine: {machine()}")
    print(f"| tensorboard | images/s (median of {args.reps}) | runs |")
    print("| --- | ---: | --- |")
    for name, med in (("on", on), ("off", off)):
        print(f"| {name} | {med:.0f} | {', '.join(f'{v:.0f}' for v in runs[name])} |")
    print(f"on / off: {on / off:.3f}")


if __name__ == "__main__":
    main()
