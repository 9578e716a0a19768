#!/usr/bin/env python3
"""Plots fleet-simulator runs: window processing share, controller RSS and
reconnect time against fleet size, before and after the scale work.

Input: CSV files of `pingmesh-fleet-sim --csv` lines (one header line, then
one row per run; extra header lines from concatenated runs are skipped),
each given as LABEL=PATH. Output: an SVG (docs/scale/fleet-scale.svg).

    pip install matplotlib
    python3 hack/plot-scale.py before=docs/scale/before.csv after=docs/scale/after.csv \\
        -o docs/scale/fleet-scale.svg
"""

import argparse
import csv

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402

WINDOW_S = 5.0


def rows(path):
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["endpoints"] == "endpoints":
                continue
            yield row


def number(value):
    return float(value) if value not in ("", None) else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=CSV")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--window-s", type=float, default=WINDOW_S)
    args = parser.parse_args()

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for run in args.runs:
        label, path = run.split("=", 1)
        data = sorted(rows(path), key=lambda r: int(r["endpoints"]))
        x = [int(r["endpoints"]) for r in data]

        def series(fn):
            pts = [(xi, fn(r)) for xi, r in zip(x, data)]
            return [p[0] for p in pts if p[1] is not None], [p[1] for p in pts if p[1] is not None]

        def share(r):
            phases = [number(r[k]) for k in ("ingest_s", "evaluate_s", "publish_s")]
            if any(p is None for p in phases):
                return None
            return 100.0 * sum(phases) / args.window_s

        for ax, fn in zip(
            axes,
            (share, lambda r: number(r["rss_mib"]), lambda r: number(r["settled_s"])),
        ):
            xs, ys = series(fn)
            ax.plot(xs, ys, marker="o", label=label)

    titles = (
        (f"window processing, % of a {args.window_s:.0f} s window", 20, "target 20 %"),
        ("controller RSS, MiB", 2048, "target 2 GiB"),
        ("restart: fleet reconnected and settled, s", 60, "target 60 s"),
    )
    for ax, (title, target, target_label) in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log")
        ax.set_xlabel("endpoints")
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=target_label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output)


if __name__ == "__main__":
    main()
