#!/usr/bin/env python3
"""Gantry vs PyTorch, side by side on this machine: images/s of the default MLP GAN job, or of
another model family against its PyTorch twin (--family).

For each (world size, batch size) it runs Gantry's release `worker` (standalone for world 1,
a static ring group for world 2) and bench/torch_gan.py under torchrun (DDP + gloo for world
2) in up to three PyTorch setups: eager with its default Adam (the `pytorch` column), eager
with fused Adam (`fused=True`), and torch.compile of both networks with fused Adam. All of
them alternate (the order rotates each repetition), several repetitions, one intra-op thread
per rank; each times the same steps after a warm-up (torch.compile's longer, so that
compiling stays out of the timed steps: the script reports any graph compiled while timed).
Reports the median and spread of images/s, the best PyTorch setup per row and the ratios
Gantry / best PyTorch (the one that counts) and Gantry / default PyTorch, the step-phase
breakdown, scaling efficiency of world 2 over world 1 (per rank: images/s(2) / (2 x
images/s(1))), and a least-squares model of step time against batch size (compute) plus a
constant per-world term (all-reduce).

Gantry is also run as users run it, through the coordinator (`coordinator --workers N`:
rendezvous, heartbeats, the metrics endpoints, generator EMA on by default), with EMA on and
off, at world 1 and 2 (`--coordinator-worlds`, batch `--coordinator-batch`); "EMA cost" is
1 - images/s(EMA on) / images/s(EMA off), and "EMA work" the growth of the optimiser phase
(where the EMA update runs) over the EMA-off step time, which the host's drift between the
two runs moves far less.

`--family vae` and `--family autoregressive` run the same grid for Gantry's MLP VAE and
PixelCNN against their twins, bench/torch_vae.py and bench/torch_pixelcnn.py (same
architecture, loss, Adam, batch per rank and data; DDP + gloo at world 2), at the family's
default batch (128 and 64). The coordinator rows are the GAN's (its generator EMA).
`--precision bf16` runs every family under bf16 autocast on both sides.

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


# Model families, by --family name: the PyTorch script of the same job and the flags it always
# gets (the twins evaluate held-out likelihood after training unless told not to: not timed,
# but minutes of a benchmark), the Gantry keys that choose the family, the batch sizes per rank
# and the timed images per rank and run unless --batches / --images say otherwise, and the
# PyTorch setups the twin has (TORCH_VARIANTS names; the default --torch-variants).
FAMILIES = {
    "gan": {"script": "torch_gan.py", "script_flags": [], "sets": {}, "batches": "16,64,256",
            "images": 12800, "variants": "default,fused,compile"},
    "vae": {"script": "torch_vae.py", "script_flags": ["--no-eval"],
            "sets": {"model.family": "vae"}, "batches": "128", "images": 25600,
            "variants": "default,fused,compile"},
    "autoregressive": {"script": "torch_pixelcnn.py", "script_flags": ["--no-eval"],
                       "sets": {"model.family": "autoregressive"}, "batches": "64",
                       "images": 5120, "variants": "default,fused,compile,channels_last,tuned"},
}
MODEL_NAMES = {"gan": "MLP GAN", "vae": "MLP VAE", "autoregressive": "PixelCNN"}


def gantry_args(batch, steps, warmup, run_dir, precision="fp32", extra_sets=(), ema=False,
                family="gan"):
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
        # The PyTorch reference keeps no generator EMA: equal work (Gantry's EMA rides along
        # with G's Adam pass; its cost is measured by the coordinator rows).
        "train.ema_decay": 0,
        "metrics.worker_addr": "127.0.0.1:0",
        "train.precision": precision,
    }
    if ema or family != "gan":
        # Gantry's default generator EMA (train.ema_decay 0.999), as users run it; a key of
        # the GAN's that the other families refuse.
        del sets["train.ema_decay"]
    sets.update(FAMILIES[family]["sets"])
    for item in extra_sets:
        key, _, value = item.partition("=")
        sets[key] = value
    args = ["--run-dir", run_dir]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def measure_run(run_dir, world, batch, warmup):
    """Images/s of a finished Gantry run from what it wrote: the marginal rate between the
    metrics row at the end of warm-up and the last row (rendezvous, start-up and warm-up
    left out), with summary.json's whole-run figure beside it."""
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
        "summary_images_per_second": summary.get("images_per_second"),
        "summary_train_seconds": summary.get("train_seconds"),
    }


def run_gantry(worker, world, batch, steps, warmup, precision="fp32", extra_sets=(),
               family="gan"):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        args = gantry_args(batch, steps, warmup, run_dir, precision, extra_sets, family=family)
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
        return measure_run(run_dir, world, batch, warmup)


def run_coordinator(coordinator, worker, world, batch, steps, warmup, ema, precision="fp32",
                    extra_sets=()):
    """`coordinator --workers N` with its local workers, as users start a job: rendezvous over
    gRPC, heartbeats (cluster.heartbeat_interval), the coordinator's and each worker's
    metrics endpoint, TensorBoard logs, and the generator EMA unless `ema` is false. Samples,
    checkpoints and evaluation stay off as in the other Gantry rows (periodic, not per step)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        args = gantry_args(batch, steps, warmup, run_dir, precision, extra_sets, ema=ema)
        out = subprocess.run(
            [coordinator, "--workers", str(world), "--worker-bin", worker, *args],
            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if out.returncode != 0:
            logs = ""
            for name in sorted(os.listdir(os.path.join(run_dir, "logs"))
                               if os.path.isdir(os.path.join(run_dir, "logs")) else []):
                logs += f"\n--- {name}\n" + open(os.path.join(run_dir, "logs", name)).read()[-4000:]
            raise RuntimeError("gantry coordinator failed:\n"
                               + out.stderr.decode(errors="replace") + logs)
        return measure_run(run_dir, world, batch, warmup)


def run_torch(python, world, batch, steps, warmup, extra=(), family="gan"):
    script, flags = FAMILIES[family]["script"], FAMILIES[family]["script_flags"]
    command = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               os.path.join(REPO, "bench", script), "--batch-size", str(batch),
               "--steps", str(steps), "--warmup", str(warmup), "--threads", "1", *flags, *extra]
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


# PyTorch setups, by --torch-variants name: (result key, twin flags). "pytorch" is the
# original column (eager, default Adam); the others are PyTorch's best settings on CPU.
# channels_last and tuned are for the convolutional twin only (its FAMILIES entry lists them):
# tuned also convolves only the kernel rows the PixelCNN's masks keep, as Gantry does.
TORCH_VARIANTS = {
    "default": ("pytorch", []),
    "fused": ("pytorch_fused", ["--fused"]),
    "compile": ("pytorch_compile", ["--compile", "--fused"]),
    "channels_last": ("pytorch_channels_last", ["--fused", "--channels-last"]),
    "tuned": ("pytorch_tuned", ["--fused", "--channels-last", "--cropped-kernels"]),
}
TORCH_KEYS = [key for key, _ in TORCH_VARIANTS.values()]
COORDINATOR_KEYS = ["coordinator_ema", "coordinator_no_ema"]
LABELS = {
    "gantry": "Gantry",
    "pytorch": "PyTorch eager",
    "pytorch_fused": "PyTorch fused Adam",
    "pytorch_compile": "PyTorch compile + fused Adam",
    "pytorch_channels_last": "PyTorch channels-last + fused Adam",
    "pytorch_tuned": "PyTorch channels-last + fused Adam + cropped kernels",
    "coordinator_ema": "Gantry coordinator, EMA on",
    "coordinator_no_ema": "Gantry coordinator, EMA off",
}


def int_list(text):
    return [int(x) for x in text.split(",") if x.strip() and x.strip() != "none"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=os.path.join(REPO, "target", "release", "worker"))
    parser.add_argument("--coordinator",
                        default=os.path.join(REPO, "target", "release", "coordinator"))
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--family", choices=list(FAMILIES), default="gan",
                        help="the model family: gan (MLP GAN), vae (MLP VAE) or autoregressive "
                             "(PixelCNN), each against its PyTorch twin")
    parser.add_argument("--batches", default=None,
                        help="batch sizes per rank (default: the family's, GAN 16,64,256)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--images", type=int, default=None,
                        help="timed images per rank and run (steps = images / batch; default: "
                             "the family's, GAN 12800)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--compile-warmup", type=int, default=None,
                        help="warm-up steps of the torch.compile runs (default: 2 x --warmup); "
                             "compiling happens in the first step, and the script reports any "
                             "graph compiled during the timed steps")
    parser.add_argument("--torch-variants", default=None,
                        help="PyTorch setups to run, any of: default (eager, default Adam), "
                             "fused (eager, Adam fused=True), compile (torch.compile, fused "
                             "Adam), channels_last (eager, fused Adam, NHWC; PixelCNN only), "
                             "tuned (channels_last with Gantry's cropped masked kernels); "
                             "default: all the family's twin has")
    parser.add_argument("--coordinator-worlds", default=None,
                        help="world sizes of the Gantry rows through `coordinator --workers N` "
                             "(EMA on and off; default 1,2 for the GAN, none otherwise); 'none' "
                             "skips them")
    parser.add_argument("--coordinator-batch", type=int, default=64)
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="both systems: fp32, or bf16 autocast (Gantry train.precision)")
    parser.add_argument("--gantry-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Gantry setting, e.g. collective.shared_memory=false")
    args = parser.parse_args()

    family = FAMILIES[args.family]
    gan = args.family == "gan"
    if args.coordinator_worlds is None:
        args.coordinator_worlds = "1,2" if gan else "none"
    if not gan and int_list(args.coordinator_worlds):
        parser.error("--coordinator-worlds: the coordinator rows measure the GAN's generator "
                     "EMA; use --family gan")
    images = args.images or family["images"]
    worlds = int_list(args.worlds)
    batches = int_list(args.batches or family["batches"])
    coordinator_worlds = int_list(args.coordinator_worlds)
    variants = [v.strip() for v in (args.torch_variants or family["variants"]).split(",")
                if v.strip()]
    offered = family["variants"].split(",")
    unknown = [v for v in variants if v not in offered]
    if unknown:
        parser.error(f"--torch-variants: {', '.join(unknown)} not a setup of the "
                     f"{args.family} twin (choose from {', '.join(offered)})")
    compile_warmup = args.compile_warmup or 2 * args.warmup
    bf16 = ["--bf16"] if args.precision == "bf16" else []

    # Every (world, batch) cell and the systems it runs, in the order of repetition 1; later
    # repetitions rotate it so that each system takes each place in turn.
    cells = {}
    for world in worlds:
        for batch in batches:
            cells[(world, batch)] = ["gantry"] + [TORCH_VARIANTS[v][0] for v in variants]
    for world in coordinator_worlds:
        cells.setdefault((world, args.coordinator_batch), []).extend(COORDINATOR_KEYS)

    results = {}
    started = time.time()
    for rep in range(args.reps):
        for (world, batch), systems in cells.items():
            steps = max(args.warmup, images // batch)
            steps -= steps % args.warmup
            shift = rep % len(systems)
            for system in systems[shift:] + systems[:shift]:
                if system == "gantry":
                    r = run_gantry(args.worker, world, batch, steps, args.warmup,
                                   args.precision, args.gantry_set, args.family)
                elif system in COORDINATOR_KEYS:
                    r = run_coordinator(args.coordinator, args.worker, world, batch, steps,
                                        args.warmup, system == "coordinator_ema",
                                        args.precision, args.gantry_set)
                else:
                    flags = next(f for k, f in TORCH_VARIANTS.values() if k == system)
                    warmup = compile_warmup if "--compile" in flags else args.warmup
                    r = run_torch(args.python, world, batch, steps, warmup, bf16 + flags,
                                  args.family)
                    if r.get("compiled_graphs_while_timed"):
                        print(f"warning: {system} compiled {r['compiled_graphs_while_timed']} "
                              "graph(s) during the timed steps; raise --compile-warmup",
                              file=sys.stderr)
                results.setdefault((world, batch), {}).setdefault(system, []).append(r)
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
            if system in TORCH_KEYS:
                row[system + "_system"] = runs[0].get("system", system)
            if system == "pytorch_compile":
                row["pytorch_compile_warmup"] = compile_warmup
                row["pytorch_compile_graphs_while_timed"] = max(
                    r.get("compiled_graphs_while_timed", 0) for r in runs)
        if "gantry" in row and "pytorch" in row:
            row["ratio"] = row["gantry"]["median"] / row["pytorch"]["median"]
        present = [k for k in TORCH_KEYS if k in row]
        if present:
            best = max(present, key=lambda k: row[k]["median"])
            row["pytorch_best"] = best
            row["pytorch_best_median"] = row[best]["median"]
            if "gantry" in row:
                row["ratio_best"] = row["gantry"]["median"] / row[best]["median"]
        if all(k in row for k in COORDINATOR_KEYS):
            on, off = row["coordinator_ema"]["median"], row["coordinator_no_ema"]["median"]
            row["ema_cost"] = 1 - on / off
            # The EMA's own work, all of it in the optimiser phase (it rides along with G's
            # Adam pass): its growth over the EMA-off step, a figure the host's drift between
            # the two runs moves far less than their images/s.
            optimiser_on = row["coordinator_ema_phases"].get("optimizer")
            optimiser_off = row["coordinator_no_ema_phases"].get("optimizer")
            if optimiser_on is not None and optimiser_off is not None:
                row["ema_work"] = ((optimiser_on - optimiser_off)
                                   / row["coordinator_no_ema_step_seconds"])
            if "gantry" in row:
                # What the coordinator itself costs: EMA off there, as in the direct rows.
                row["coordinator_overhead"] = 1 - off / row["gantry"]["median"]
            if present:
                row["coordinator_ratio_best"] = on / row["pytorch_best_median"]
        table.append(row)

    by_key = {(r["world_size"], r["batch_size"]): r for r in table}
    scaling = []
    for batch in sorted({b for _, b in by_key}):
        if (1, batch) in by_key and (2, batch) in by_key:
            entry = {"batch_size": batch}
            for system in ["gantry"] + TORCH_KEYS + COORDINATOR_KEYS:
                if system in by_key[(1, batch)] and system in by_key[(2, batch)]:
                    one = by_key[(1, batch)][system]["median"]
                    two = by_key[(2, batch)][system]["median"]
                    entry[system] = {"world2_over_world1": two / one,
                                     "efficiency": two / (2 * one)}
            scaling.append(entry)

    models = {}
    for system in ["gantry"] + TORCH_KEYS:
        for world in worlds:
            points = [(b, by_key[(world, b)][system + "_step_seconds"]) for b in batches
                      if (world, b) in by_key and system in by_key[(world, b)]]
            if len(points) >= 2:
                a, c, r2 = fit_line(points)
                models[f"{system}_world{world}"] = {
                    "fixed_seconds": a, "seconds_per_image": c, "r2": r2}

    report = {
        "machine": machine(),
        "command": "make bench",
        "family": args.family,
        "model": MODEL_NAMES[args.family],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_seconds": time.time() - started,
        "reps": args.reps,
        "precision": args.precision,
        "gantry_settings": args.gantry_set,
        "torch_variants": variants,
        "warmup": args.warmup,
        "compile_warmup": compile_warmup,
        "rows": table,
        "scaling": scaling,
        "step_time_model": models,
    }
    markdown = render(report)
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if not gan:
        stamp += f"-{args.family}"
    with open(os.path.join(args.out, f"{stamp}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, f"{stamp}.md"), "w") as f:
        f.write(markdown)
    print(markdown)


def cell(value):
    if not value:
        return "–"
    return f"{value['median']:.0f} [{value['min']:.0f}–{value['max']:.0f}]"


def render(report):
    extra = "".join(f", Gantry {s}" for s in report.get("gantry_settings", []))
    rows = report["rows"]
    torch_keys = [k for k in TORCH_KEYS if any(k in r for r in rows)]
    compile_note = ""
    if "pytorch_compile" in torch_keys:
        compile_note = (f" torch.compile runs warm up {report.get('compile_warmup')} steps "
                        f"(the others {report.get('warmup')}), none timed while compiling.")
        if any(r.get("pytorch_compile_graphs_while_timed") for r in rows):
            compile_note = (" torch.compile compiled graphs during some timed steps "
                            "(pytorch_compile_graphs_while_timed in the JSON): its figures "
                            "are low.")
    lines = [f"{report.get('model', 'MLP GAN')}. "
             f"Machine: {report['machine']}. {report['reps']} repetitions, alternating, "
             f"one intra-op thread per rank, {report.get('precision', 'fp32')}{extra}; "
             f"median [min–max] images/s.{compile_note}", ""]
    grid = [r for r in rows if "gantry" in r]
    if grid:
        head = ["world", "batch/rank", "Gantry images/s"] + [LABELS[k] for k in torch_keys]
        head += ["best PyTorch", "Gantry / best PyTorch"]
        if "pytorch" in torch_keys:
            head += ["Gantry / PyTorch eager"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for r in grid:
            cells = [str(r["world_size"]), str(r["batch_size"]), cell(r["gantry"])]
            cells += [cell(r.get(k)) for k in torch_keys]
            best = r.get("pytorch_best") or max(
                (k for k in torch_keys if k in r), key=lambda k: r[k]["median"], default=None)
            cells += [LABELS[best] if best else "–",
                      f"{r['ratio_best']:.2f}x" if "ratio_best" in r else "–"]
            if "pytorch" in torch_keys:
                cells += [f"{r['ratio']:.2f}x" if "ratio" in r else "–"]
            lines.append("| " + " | ".join(cells) + " |")
    through = [r for r in rows if any(k in r for k in COORDINATOR_KEYS)]
    if through:
        lines += ["", "Gantry as users run it, through `coordinator --workers N` (rendezvous, "
                  "heartbeats, metrics endpoints; generator EMA on by default, "
                  "`train.ema_decay=0` off); EMA cost = 1 − EMA on / EMA off; EMA work = "
                  "(optimiser phase with EMA − without) / step without EMA, the EMA's own "
                  "time; coordinator overhead = 1 − coordinator (EMA off) / direct worker:", "",
                  "| world | batch/rank | Gantry worker (EMA off) | coordinator, EMA on | "
                  "coordinator, EMA off | EMA cost | EMA work | coordinator overhead | "
                  "coordinator EMA on / best PyTorch |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in through:
            pct = lambda k: f"{r[k]:.1%}" if k in r else "–"
            lines.append(
                f"| {r['world_size']} | {r['batch_size']} | {cell(r.get('gantry'))} "
                f"| {cell(r.get('coordinator_ema'))} | {cell(r.get('coordinator_no_ema'))} "
                f"| {pct('ema_cost')} | {pct('ema_work')} | {pct('coordinator_overhead')} | "
                + (f"{r['coordinator_ratio_best']:.2f}x |" if "coordinator_ratio_best" in r
                   else "– |"))
    if not report["scaling"]:
        return "\n".join(lines) + "\n"
    # The coordinator rows' scaling is in the JSON; the table keeps to the direct comparison.
    systems = [k for k in ["gantry"] + TORCH_KEYS if any(k in s for s in report["scaling"])]
    head = ["batch/rank"]
    for k in systems:
        head += [f"{LABELS[k]} w2/w1", f"{LABELS[k]} efficiency"]
    lines += ["", "Scaling, world 2 over world 1 on the same cores (efficiency = images/s(2) / "
              "(2 × images/s(1))):", "",
              "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for s in report["scaling"]:
        cells = [str(s["batch_size"])]
        for k in systems:
            cells += ([f"{s[k]['world2_over_world1']:.2f}x", f"{s[k]['efficiency']:.0%}"]
                      if k in s else ["–", "–"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Step phases, median ms per step:", ""]
    for r in report["rows"]:
        for system in ["gantry"] + TORCH_KEYS + COORDINATOR_KEYS:
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
