"""The docs' sweep table from experiments/sweep.sh's runs: one row per line of the sweep file.
(Times are left out: sweep runs share the machine with other work, so they are not benchmarks.)

    python experiments/sweep_table.py --sweep=experiments/sweep_mmdvae.txt --runs=runs/mmd --code=36c6f56

Each run's figures are kept in experiments/sweep_results.csv, which is committed: runs/ is
not, and the sweep ran over many sessions and machines, so no one machine holds every run's
evaluate.py JSON. The JSONs found under --runs update the CSV (a rerun replaces its row), and
the table is printed from the CSV. A row reads "not run" only when no machine has scored it. Each row
names the code it ran on (--code, a commit); rows from before the MMD-VAE default read "hybrid era".
"""
import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import atomic_write, parse_overrides, require, run  # noqa: E402

# evaluate.py's keys that the table shows, in its column order; gmm_fid is empty for runs made before
# prior.py.
FIELDS = ("fid", "is", "coverage", "gmm_fid", "gmm_is", "recon_fid", "mse", "mmd_prior")


def read_results(path):
    """{run name: {field: float or None}} from the CSV (empty if there is none yet)."""
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        return {row["run"]: {"code": row.get("code") or "hybrid era",
                             **{k: float(row[k]) if row.get(k) else None for k in FIELDS}}
                for row in csv.DictReader(f)}


def write_results(path, results, order):
    """The CSV, its rows in the sweep file's order (runs no longer in it last, so nothing is lost)."""
    names = [n for n in order if n in results] + sorted(set(results) - set(order))
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        # None is written as an empty field, which read_results reads back
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("run", "code") + FIELDS)
        writer.writerows([name, results[name]["code"], *(results[name][k] for k in FIELDS)] for name in names)


def main(argv):
    cfg, _ = parse_overrides({"sweep": "experiments/sweep_mmdvae.txt", "runs": "runs/mmd", "code": "",
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
            require(cfg["code"], "--code must name the commit that the runs in --runs ran on")
            results[name] = {"code": cfg["code"], **{k: scored.get(k) for k in FIELDS}}
    write_results(cfg["results"], results, [name for name, _ in runs])

    columns = {"fid": "N(0, I) FID", "is": "IS", "coverage": "coverage", "gmm_fid": "ex-post FID",
               "gmm_is": "ex-post IS", "recon_fid": "recon FID", "mse": "test MSE"}
    formats = {"is": ".2f", "gmm_is": ".2f", "coverage": ".2f", "recon_fid": ".2f", "gmm_fid": ".2f",
               "mse": ".5f"}
    print("| run | options | " + " | ".join(columns.values()) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name, options in runs:
        r = results.get(name)
        if r is None:
            print(f"| {name} | `{options}` | not run |" + " |" * (len(columns) - 1))
            continue
        values = ["" if r[k] is None else format(r[k], formats.get(k, ".1f")) for k in columns]
        print(f"| {name} | `{options}` | " + " | ".join(values) + " |")


if __name__ == "__main__":
    run(main)
