#!/usr/bin/env python3
"""Gantry vs PyTorch, side by side on this machine: images/s of the default MLP GAN job.

For each (world size, batch size) it runs Gantry's release `worker` (standalone for world 1,
a static ring group for world 2) and bench/torch_gan.py under torchrun (eager; DDP + gloo
for world 2), alternating the two, several repetitions, one intra-op thread per rank. Both
time the same steps after the same warm-up. Reports the median and spread of images/s, the
ratio Gantry / PyTorch, the step-phase breakdown of both, scaling efficiency of world 2 over
world 1 (per rank: images/s(2) / (2 x images/s(1))), and a least-squares model of step time
against batch size (compute) plus a constant per-world term (all-reduce).

Writes bench/results/<stamp>.json and .md and prints the Markdown.
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("GANTRY")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def gantry_args(batch, steps, warmup, run_dir, precision="fp32", extra_sets=()):
    total = warmup + steps
    sets = {
        "train.steps": total,
        "train.batch_size": batch,
        "train.threads": 1,
        # One logged row at the end of warm-up and one at the end time the same steps as
        # the PyTorch script; nothing else (samples, checkpoints, evaluation) runs between.
        "train.log_every": warmup if total % warmup == 0 else 1,
        "samples.every": 0,
        "checkpoint.every": 0,
        "eval.samples": 0,
        # The PyTorch reference keeps no generator EMA: equal work (Gantry's EMA costs one
        # lerp over G's parameters, about 0.2 ms a step on one core).
        "train.ema_decay": 0,
        "metrics.worker_addr": "127.0.0.1:0",
        "train.precision": precision,
    }
    for item in extra_sets:
        key, _, value = item.partition("=")
        sets[key] = value
    args = ["--run-dir", run_dir]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def run_gantry(worker, world, batch, steps, warmup, precision="fp32", extra_sets=()):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        args = gantry_args(batch, steps, warmup, run_dir, precision, extra_sets)
        if world == 1:
            procs = [subprocess.Popen([worker, "--standalone", *args], env=clean_env(),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
        else:
            peers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(world))
            procs = [
                subprocess.Popen(
                    [worker, "--rank", str(r), "--world-size", str(world), "--peers", peers,
                     "--workers-on-host", str(world), *args],
                    env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for r in range(world)
            ]
        errors = [p.communicate()[1].decode(errors="replace") for p in procs]
        if any(p.returncode != 0 for p in procs):
            raise RuntimeError("gantry worker failed:\n" + "\n".join(errors))
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        summary = json.load(open(os.path.join(run_dir, "summary.json")))
    at_warmup = next(r for r in rows if r["step"] == warmup)
    end = rows[-1]
    seconds = end["wall_seconds"] - at_warmup["wall_seconds"]
    images = (end["step"] - warmup) * batch * world
    return {
        "images_per_second": images / seconds,
        "step_seconds": seconds / (end["step"] - warmup),
        "phases": summary.get("step_phases", {}),
    }


def run_torch(python, world, batch, steps, warmup, extra=()):
    command = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               os.path.join(REPO, "bench", "torch_gan.py"), "--batch-size", str(batch),
               "--steps", str(steps), "--warmup", str(warmup), "--threads", "1", *extra]
    out = subprocess.run(command, env=clean_env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError("pytorch run failed:\n" + out.stdout + out.stderr)
    line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
    return json.loads(line)


def spread(values):
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": values,
    }


def fit_line(points):
    """Least squares y = a + c x; returns (a, c, r2)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    c = sum((x - mx) * (y - my) for x, y in points) / sxx
    a = my - c * mx
    ss_tot = sum((y - my) ** 2 for _, y in points)
    ss_res = sum((y - (a + c * x)) ** 2 for x, y in points)
    return a, c, (1 - ss_res / ss_tot) if ss_tot else 1.0


def machine():
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=os.path.join(REPO, "target", "release", "worker"))
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--batches", default="16,64,256")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--images", type=int, default=12800,
                        help="timed images per rank and run (steps = images / batch)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="both systems: fp32, or bf16 autocast (Gantry train.precision)")
    parser.add_argument("--gantry-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Gantry setting, e.g. collective.shared_memory=false")
    args = parser.parse_args()

    worlds = [int(w) for w in args.worlds.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    results = {}
    started = time.time()
    for rep in range(args.reps):
        for world in worlds:
            for batch in batches:
                steps = max(args.warmup, args.images // batch)
                steps -= steps % args.warmup
                key = (world, batch)
                order = ["gantry", "pytorch"] if rep % 2 == 0 else ["pytorch", "gantry"]
                for system in order:
                    if system == "gantry":
                        r = run_gantry(args.worker, world, batch, steps, args.warmup,
                                       args.precision, args.gantry_set)
                    else:
                        extra = ["--bf16"] if args.precision == "bf16" else []
                        r = run_torch(args.python, world, batch, steps, args.warmup, extra)
                    results.setdefault(key, {}).setdefault(system, []).append(r)
                    print(f"rep {rep + 1}/{args.reps} world {world} batch {batch} {system}: "
                          f"{r['images_per_second']:.0f} images/s", file=sys.stderr, flush=True)

    table = []
    for (world, batch), systems in sorted(results.items()):
        row = {"world_size": world, "batch_size": batch}
        for system, runs in systems.items():
            row[system] = spread([r["images_per_second"] for r in runs])
            phases = {}
            for r in runs:
                for k, v in r["phases"].items():
                    phases.setdefault(k, []).append(v)
            row[system + "_phases"] = {k: statistics.median(v) for k, v in phases.items()}
            row[system + "_step_seconds"] = statistics.median(r["step_seconds"] for r in runs)
        row["ratio"] = row["gantry"]["median"] / row["pytorch"]["median"]
        table.append(row)

    by_key = {(r["world_size"], r["batch_size"]): r for r in table}
    scaling = []
    for batch in batches:
        if (1, batch) in by_key and (2, batch) in by_key:
            entry = {"batch_size": batch}
            for system in ("gantry", "pytorch"):
                one = by_key[(1, batch)][system]["median"]
                two = by_key[(2, batch)][system]["median"]
                entry[system] = {"world2_over_world1": two / one, "efficiency": two / (2 * one)}
            scaling.append(entry)

    models = {}
    for system in ("gantry", "pytorch"):
        for world in worlds:
            points = [(b, by_key[(world, b)][system + "_step_seconds"]) for b in batches
                      if (world, b) in by_key]
            if len(points) >= 2:
                a, c, r2 = fit_line(points)
                models[f"{system}_world{world}"] = {
                    "fixed_seconds": a, "seconds_per_image": c, "r2": r2}

    report = {
        "machine": machine(),
        "command": "make bench",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_seconds": time.time() - started,
        "reps": args.reps,
        "precision": args.precision,
        "gantry_settings": args.gantry_set,
        "rows": table,
        "scaling": scaling,
        "step_time_model": models,
    }
    markdown = render(report)
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    with open(os.path.join(args.out, f"{stamp}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, f"{stamp}.md"), "w") as f:
        f.write(markdown)
    print(markdown)


def render(report):
    extra = "".join(f", Gantry {s}" for s in report.get("gantry_settings", []))
    lines = [f"Machine: {report['machine']}. {report['reps']} repetitions, alternating, "
             f"one intra-op thread per rank, {report.get('precision', 'fp32')}{extra}; "
             "median [min–max] images/s.", "",
             "| world | batch/rank | Gantry images/s | PyTorch images/s | Gantry / PyTorch |",
             "|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        g, p = r["gantry"], r["pytorch"]
        lines.append(
            f"| {r['world_size']} | {r['batch_size']} | {g['median']:.0f} [{g['min']:.0f}–{g['max']:.0f}] "
            f"| {p['median']:.0f} [{p['min']:.0f}–{p['max']:.0f}] | {r['ratio']:.2f}x |")
    if not report["scaling"]:
        return "\n".join(lines) + "\n"
    lines += ["", "Scaling, world 2 over world 1 on the same cores (efficiency = images/s(2) / "
              "(2 × images/s(1))):", "",
              "| batch/rank | Gantry w2/w1 | Gantry efficiency | PyTorch w2/w1 | PyTorch efficiency |",
              "|---:|---:|---:|---:|---:|"]
    for s in report["scaling"]:
        g, p = s["gantry"], s["pytorch"]
        lines.append(f"| {s['batch_size']} | {g['world2_over_world1']:.2f}x | {g['efficiency']:.0%} "
                     f"| {p['world2_over_world1']:.2f}x | {p['efficiency']:.0%} |")
    lines += ["", "Step phases, median ms per step:", ""]
    for r in report["rows"]:
        for system in ("gantry", "pytorch"):
            phases = r.get(system + "_phases") or {}
            if phases:
                parts = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in phases.items())
                lines.append(f"- world {r['world_size']}, batch {r['batch_size']}, {system}: "
                             f"step {r[system + '_step_seconds'] * 1e3:.2f} ms = {parts}")
    if not report["step_time_model"]:
        return "\n".join(lines) + "\n"
    lines += ["", "Step time model, least squares over batch sizes: step = fixed + per_image × batch:", ""]
    for name, m in report["step_time_model"].items():
        lines.append(f"- {name}: fixed {m['fixed_seconds'] * 1e3:.2f} ms + "
                     f"{m['seconds_per_image'] * 1e6:.1f} µs/image (R² {m['r2']:.3f})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
