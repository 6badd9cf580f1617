"""The README's sweep table from experiments/sweep.sh's runs: one row per line of the sweep file.
(Times are left out: sweep runs share the machine with other work, so they are not benchmarks.)

    python experiments/sweep_table.py --sweep=experiments/sweep_prior.txt --runs=runs/sweep
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import parse_overrides, run  # noqa: E402


def main(argv):
    cfg, _ = parse_overrides({"sweep": "experiments/sweep_prior.txt", "runs": "runs/sweep"}, argv,
                             "experiments/sweep_table.py")
    rows = []
    with open(cfg["sweep"]) as f:
        for line in f:
            if line.strip() and not line.lstrip().startswith("#"):
                name, _, options = line.strip().partition(" ")
                path, result = os.path.join(cfg["runs"], name + ".json"), None
                if os.path.exists(path):
                    with open(path) as g:
                        result = json.load(g)
                rows.append((name, options.strip(), result))
    with_gmm = any(r and r.get("gmm_fid") is not None for _, _, r in rows)  # runs made before prior.py have none
    columns = ["N(0, I) FID", "IS", "coverage"] + (["ex-post FID"] if with_gmm else []) + ["test MSE", "MMD^2 to prior"]
    print("| run | options | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name, options, r in rows:
        if r is None:
            print(f"| {name} | `{options}` | not run |" + " |" * (len(columns) - 1))
            continue
        gmm = [f"{r['gmm_fid']:.1f}" if r.get("gmm_fid") is not None else ""] if with_gmm else []
        values = [f"{r['fid']:.1f}", f"{r['is']:.2f}", f"{r['coverage']:.1f}"] + gmm + [f"{r['mse']:.5f}",
                                                                                      f"{r['mmd_prior']:.1e}"]
        print(f"| {name} | `{options}` | " + " | ".join(values) + " |")


if __name__ == "__main__":
    run(main)
