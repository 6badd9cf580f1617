"""The README's sweep table from experiments/sweep.sh's runs: one row per line of the sweep file.
(Times are left out: sweep runs share the machine with other work, so they are not benchmarks.)

    python experiments/sweep_table.py --sweep=experiments/sweep_prior.txt --runs=runs/sweep

Each run's figures are kept in experiments/sweep_results.csv, which is committed: runs/ is
not, and the sweep ran over many sessions and machines, so no one machine holds every run's
evaluate.py JSON. The JSONs found under --runs update the CSV (a rerun replaces its row), and
the table is printed from the CSV. A row reads "not run" only when no machine has scored it.
"""
import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import atomic_write, parse_overrides, run  # noqa: E402

# evaluate.py's keys that the table shows, in its column order; gmm_fid is empty for runs made before prior.py.
FIELDS = ("fid", "is", "coverage", "gmm_fid", "mse", "mmd_prior")


def read_results(path):
    """{run name: {field: float or None}} from the CSV (empty if there is none yet)."""
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        return {row["run"]: {k: float(row[k]) if row[k] else None for k in FIELDS} for row in csv.DictReader(f)}


def write_results(path, results, order):
    """The CSV, its rows in the sweep file's order (runs no longer in it last, so nothing is lost)."""
    names = [n for n in order if n in results] + sorted(set(results) - set(order))
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")  # None is written as an empty field, which read_results reads back
        writer.writerow(("run",) + FIELDS)
        writer.writerows([name, *(results[name][k] for k in FIELDS)] for name in names)


def main(argv):
    cfg, _ = parse_overrides({"sweep": "experiments/sweep_prior.txt", "runs": "runs/sweep",
                              "results": "experiments/sweep_results.csv"}, argv, "experiments/sweep_table.py")
    runs = []
    with open(cfg["sweep"]) as f:
        for line in f:
            if line.strip() and not line.lstrip().startswith("#"):
                name, _, options = line.strip().partition(" ")
                runs.append((name, options.strip()))
    results = read_results(cfg["results"])
    for name, _ in runs:
        path = os.path.join(cfg["runs"], name + ".json")
        if os.path.exists(path):
            with open(path) as g:
                scored = json.load(g)
            results[name] = {k: scored.get(k) for k in FIELDS}
    write_results(cfg["results"], results, [name for name, _ in runs])

    with_gmm = any(r.get("gmm_fid") is not None for r in results.values())
    columns = ["N(0, I) FID", "IS", "coverage"] + (["ex-post FID"] if with_gmm else []) + ["test MSE", "MMD^2 to prior"]
    print("| run | options | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name, options in runs:
        r = results.get(name)
        if r is None:
            print(f"| {name} | `{options}` | not run |" + " |" * (len(columns) - 1))
            continue
        gmm = [f"{r['gmm_fid']:.1f}" if r["gmm_fid"] is not None else ""] if with_gmm else []
        values = [f"{r['fid']:.1f}", f"{r['is']:.2f}", f"{r['coverage']:.1f}"] + gmm + [f"{r['mse']:.5f}",
                                                                                      f"{r['mmd_prior']:.1e}"]
        print(f"| {name} | `{options}` | " + " | ".join(values) + " |")


if __name__ == "__main__":
    run(main)
