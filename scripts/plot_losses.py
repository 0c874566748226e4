"""Plot the flow-matching loss of every run under a results folder (the README's loss plot).

    python scripts/plot_losses.py results/small assets/losses.png

matplotlib is needed here only: pip install matplotlib.
"""
import glob
import json
import os
import sys


def main(results, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install matplotlib")
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for path in sorted(glob.glob(os.path.join(results, "*", "*", "metrics.jsonl"))):
        rows = [json.loads(line) for line in open(path)]
        name = os.path.relpath(path, results).split(os.sep)[0]
        ax.plot([r["step"] for r in rows], [r["fm"] for r in rows], label=name, lw=1.2)
    ax.set(xlabel="step", ylabel="flow-matching loss (mean of 50 steps)", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
