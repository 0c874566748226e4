"""The tables and the sample figure of scripts/fashion_mnist.sh's results folder.

    python scripts/fashion_mnist_report.py results/fashion_mnist     # -> report.md and samples.png in it

Tables: FID-10K of each model (mean and spread over the seeds, Euler-50 and Adams-2-25) beside the
real-data floor; the FID of the milestone checkpoints against steps and against GPU time,
where GPU time is steps x each model's step time alone (bench.py, step_time.txt), since the runs
shared one GPU; PixNerd against the Baseline at the Baseline's final GPU time (paper Fig. 5); the
encoding and normalisation variants; the CFG sweep. Figure: per class, test images, then PixNerd
and Baseline samples of the first seed (Euler-50, no guidance).
"""
import glob
import os
import re
import sys

import numpy as np
from PIL import Image


def fid_in(path):
    """The FID line of a fid.py output file, or None if it is missing."""
    if not os.path.exists(path):
        return None
    m = re.search(r"^FID\s+([0-9.]+)", open(path).read(), re.M)
    return float(m.group(1)) if m else None


def curve(R, name):
    """{step: FID} of a run's milestone checkpoints (the files NAME-stepS.fid.txt)."""
    found = {int(re.search(r"-step(\d+)\.fid\.txt$", p).group(1)): fid_in(p) for p in glob.glob(f"{R}/{name}-step*.fid.txt")}
    return {s: f for s, f in found.items() if f is not None}


def step_times(R):
    """{head: seconds per training step} from bench.py's lines in step_time.txt."""
    text = open(f"{R}/step_time.txt").read()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^train\s+\S+\s+(\w+)\s.*s_per_iter ([0-9.]+)", text, re.M)}


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{np.mean(values):.2f}" + (f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else "")


def at(c, step):
    """A curve's FID at step, linear between its two neighbouring measurements (None outside them)."""
    steps = sorted(c)
    if not steps or not steps[0] <= step <= steps[-1]:
        return None
    return float(np.interp(step, steps, [c[s] for s in steps]))


def figure(paths, out, per_class=8, scale=3):
    """Rows of classes; one panel per npz of class-balanced images (test images, PixNerd, Baseline)."""
    panels = []
    for path in paths:
        x = np.load(path)["arr_0"]  # class-balanced, in class order (the test set: its folders' order)
        rows = np.split(x[: len(x) // 10 * 10], 10)
        panels.append(np.concatenate([np.concatenate(list(r[:per_class]), 1) for r in rows], 0))
    gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
    grid = np.concatenate([x for p in panels for x in (gap, p)][1:], 1)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(out)


def main(R):
    floor = fid_in(f"{R}/floor.txt")
    seeds = sorted(int(p.rsplit("-", 1)[1]) for p in glob.glob(f"{R}/pixnerd-*") if re.search(r"pixnerd-\d+$", p))
    times = step_times(R)
    out = [f"# Fashion-MNIST 32 px, class-conditional: results of {R}", "",
           f"Real-data floor (10,000 training images against the 10,000 test images): FID {floor:.2f}", "",
           "| model | FID-10K Euler-50 | FID-10K Adams-2-25 | x floor (Euler-50) | s/step alone |", "|---|---|---|---|---|"]
    for head in ("pixnerd", "baseline"):
        e = [fid_in(f"{R}/{head}-{s}-euler50.fid.txt") for s in seeds]
        a = [fid_in(f"{R}/{head}-{s}-adams2_25.fid.txt") for s in seeds]
        ratio = f"{np.mean([v for v in e if v]) / floor:.1f}" if any(e) else "n/a"
        t = times.get("nerf" if head == "pixnerd" else "linear")
        out.append(f"| {head} ({len(seeds)} seeds) | {mean_sd(e)} | {mean_sd(a)} | {ratio} | {t:.4f} |")
    for name in ("sincos", "fc1", "fc1_fc2"):
        if os.path.isdir(f"{R}/{name}-{seeds[0]}"):
            out.append(f"| {name} (seed {seeds[0]}) | {mean_sd([fid_in(f'{R}/{name}-{seeds[0]}-euler50.fid.txt')])} | "
                       f"{mean_sd([fid_in(f'{R}/{name}-{seeds[0]}-adams2_25.fid.txt')])} | | |")

    curves = {head: [curve(R, f"{head}-{s}") for s in seeds] for head in ("pixnerd", "baseline")}
    steps = sorted(set().union(*curves["pixnerd"], *curves["baseline"]))
    out += ["", "FID of the milestones (EMA, Euler-50, no guidance) along training, mean ± spread over the seeds:", "",
            "| step | PixNerd | GPU min | Baseline | GPU min |", "|---|---|---|---|---|"]
    for s in steps:
        out.append(f"| {s} | {mean_sd([c.get(s) for c in curves['pixnerd']])} | {s * times['nerf'] / 60:.1f} | "
                   f"{mean_sd([c.get(s) for c in curves['baseline']])} | {s * times['linear'] / 60:.1f} |")
    if steps:  # equal GPU time: the Baseline's last measurement against PixNerd at the same GPU time
        last = steps[-1]
        same = last * times["linear"] / times["nerf"]
        out += ["", f"At equal GPU time ({last * times['linear'] / 60:.1f} GPU minutes alone): Baseline at step {last} "
                f"{mean_sd([c.get(last) for c in curves['baseline']])}, PixNerd at step {same:.0f} "
                f"{mean_sd([at(c, same) for c in curves['pixnerd']])} (interpolated between its measurements)."]

    cfgs = sorted({float(m.group(1)) for p in glob.glob(f"{R}/*-cfg*.fid.txt") for m in [re.search(r"cfg([0-9.]+)\.fid", p)]})
    if cfgs:
        out += ["", f"CFG sweep (seed {seeds[0]}, Euler-50, FID of the FID_N samples):", "",
                "| CFG | " + " | ".join(f"{c:g}" for c in cfgs) + " |", "|---" * (len(cfgs) + 1) + "|"]
        for head in ("pixnerd", "baseline"):
            out.append(f"| {head} | " + " | ".join(mean_sd([fid_in(f"{R}/{head}-{seeds[0]}-cfg{c:g}.fid.txt")])
                                               for c in cfgs) + " |")
    paths = [f"{R}/test.npz"] + [f"{R}/{h}-{seeds[0]}-euler50.npz" for h in ("pixnerd", "baseline")]
    if all(map(os.path.exists, paths)):
        figure(paths, f"{R}/samples.png")
        out += ["", f"Samples: {R}/samples.png (per class: test images | PixNerd | Baseline, seed {seeds[0]}, Euler-50)."]
    text = "\n".join(out) + "\n"
    open(f"{R}/report.md", "w").write(text)
    print(text, end="")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isfile(f"{sys.argv[1]}/floor.txt"):
        sys.exit("usage: python scripts/fashion_mnist_report.py RESULTS  (the folder scripts/fashion_mnist.sh wrote)")
    main(sys.argv[1])
