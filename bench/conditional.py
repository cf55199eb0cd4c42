#!/usr/bin/env python3
"""Class-conditional generation, measured: the figures of docs/conditional.md.

1. Quality: the default MLP GAN trained `--steps` steps on the embedded MNIST-10k, once
   unconditional and once with `model.conditional = true` (same seed, same everything else);
   the FID of each (summary.json, 1,000 samples) and the conditional model's label_accuracy,
   per-class shares and per-class FIDs (`gantry-eval --checkpoint`).
2. Augmentation: for each subset size (default 100 and 500 labelled digits drawn from the
   evaluator's 9,000 training digits) and each of 3 seeds, the evaluator's classifier
   architecture trained for a fixed number of steps on
     (a) the real subset alone,
     (b) the subset plus `--per-class` generated digits a class, from a conditional GAN
         trained only on that subset (`gantry-eval subset` → `folder:` → `worker` →
         `gantry-eval sample`),
     (c) all 9,000 real digits (the ceiling),
   each scored on the 1,000 held-out digits. Prints a Markdown table (mean ± standard
   deviation over the seeds) and writes every raw figure to bench/results/.

Needs release binaries (`cargo build --release --bin worker --bin gantry-eval`); not part of
the tests. Usage: bench/conditional.py [--steps 2000] [--sizes 100,500] [--seeds 0,1,2]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(cmd, **kw):
    print("+ " + " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, text=True, **kw)


def json_out(cmd):
    out = run(cmd, stdout=subprocess.PIPE).stdout
    return json.loads(out.strip().splitlines()[-1])


def newest_checkpoint(run_dir: Path) -> Path:
    found = sorted((run_dir / "checkpoints").glob("step-*"))
    if not found:
        sys.exit(f"{run_dir}: no checkpoint written")
    return found[-1]


def train(bins, run_dir: Path, steps: int, seed: int, sets):
    cmd = [bins / "worker", "--standalone", "--steps", steps, "--seed", seed,
           "--run-dir", run_dir, "--set", f"checkpoint.every={steps}",
           "--set", "samples.every=0", "--set", "logging.tensorboard=false"]
    for s in sets:
        cmd += ["--set", s]
    started = time.monotonic()
    run(cmd, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def quality(bins, work: Path, steps: int):
    rows = {}
    for name, sets in [("unconditional", []), ("conditional", ["model.conditional=true"])]:
        run_dir = work / f"quality-{name}"
        seconds = train(bins, run_dir, steps, 0, sets + ["eval.samples=1000"])
        summary = json.loads((run_dir / "summary.json").read_text())
        scored = json_out([bins / "gantry-eval", "--checkpoint", newest_checkpoint(run_dir),
                           "--samples", 1000, "--seed", 1])
        rows[name] = {"train_seconds": seconds, "summary_quality": summary.get("quality"),
                      "eval": scored}
    return rows


def augment(bins, work: Path, steps: int, sizes, seeds, per_class: int, classifier_steps: int):
    rows = []
    for size in sizes:
        for seed in seeds:
            subset = work / f"subset-{size}-{seed}"
            run([bins / "gantry-eval", "subset", "--size", size, "--subset-seed", seed,
                 "--out", subset], stdout=subprocess.DEVNULL)
            run_dir = work / f"cgan-{size}-{seed}"
            train(bins, run_dir, steps, seed, ["model.conditional=true",
                                              f"data.dataset=folder:{subset}",
                                              "eval.samples=0"])
            generated = work / f"generated-{size}-{seed}"
            run([bins / "gantry-eval", "sample", "--checkpoint", newest_checkpoint(run_dir),
                 "--per-class", per_class, "--seed", seed, "--format", "png",
                 "--out", generated], stdout=subprocess.DEVNULL)
            common = ["--real-subset", size, "--subset-seed", seed, "--seed", seed,
                      "--steps", classifier_steps]
            real = json_out([bins / "gantry-eval", "augment", *common])
            mixed = json_out([bins / "gantry-eval", "augment", *common,
                              "--generated", generated])
            rows.append({"size": size, "seed": seed, "arm": "real", **real})
            rows.append({"size": size, "seed": seed, "arm": "real+generated", **mixed})
    for seed in seeds:
        full = json_out([bins / "gantry-eval", "augment", "--real-subset", 9000,
                         "--subset-seed", seed, "--seed", seed, "--steps", classifier_steps])
        rows.append({"size": 9000, "seed": seed, "arm": "all real", **full})
    return rows


def spread(values):
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {sd:.4f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="GAN training steps")
    p.add_argument("--sizes", default="100,500")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--per-class", type=int, default=500, help="generated digits per class")
    p.add_argument("--classifier-steps", type=int, default=1500)
    p.add_argument("--bins", default=str(REPO / "target" / "release"))
    p.add_argument("--skip-quality", action="store_true")
    a = p.parse_args()
    bins = Path(a.bins)
    sizes = [int(s) for s in a.sizes.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    results = {"steps": a.steps, "per_class": a.per_class,
               "classifier_steps": a.classifier_steps}
    with tempfile.TemporaryDirectory(prefix="gantry-conditional-") as tmp:
        work = Path(tmp)
        if not a.skip_quality:
            results["quality"] = quality(bins, work, a.steps)
        results["augmentation"] = augment(bins, work, a.steps, sizes, seeds, a.per_class,
                                          a.classifier_steps)

    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"conditional-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")

    if "quality" in results:
        print(f"\nQuality after {a.steps} steps (MLP GAN, MNIST-10k, seed 0):\n")
        print("| model | FID (summary) | label_accuracy | smallest class share | train s |")
        print("|---|---|---|---|---|")
        for name, row in results["quality"].items():
            ev = row["eval"]
            hist = ev.get("class_histogram") or []
            share = min(hist) / max(sum(hist), 1) if hist else float("nan")
            acc = ev.get("label_accuracy")
            acc = f"{acc:.3f}" if acc is not None else "—"
            print(f"| {name} | {row['summary_quality']['fid']:.2f} | {acc} | {share:.3f} "
                  f"| {row['train_seconds']:.0f} |")
    print(f"\nHeld-out accuracy of the classifier ({a.classifier_steps} steps), "
          f"mean ± sd over seeds {a.seeds}:\n")
    print("| real digits | real only | real + generated | all 9,000 real |")
    print("|---|---|---|---|")
    rows = results["augmentation"]
    ceiling = spread([r["test_accuracy"] for r in rows if r["arm"] == "all real"])
    for size in sizes:
        real = spread([r["test_accuracy"] for r in rows
                       if r["size"] == size and r["arm"] == "real"])
        mixed = spread([r["test_accuracy"] for r in rows
                        if r["size"] == size and r["arm"] == "real+generated"])
        print(f"| {size} | {real} | {mixed} | {ceiling} |")


if __name__ == "__main__":
    main()
