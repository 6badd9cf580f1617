"""The README's sweep table from experiments/sweep.sh's runs: one row per line of the sweep file.

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
    print("| run | options | N(0, I) FID | IS | coverage | ex-post FID | test MSE | MMD^2 to prior | minutes |")
    print("|---|---|---|---|---|---|---|---|---|")
    with open(cfg["sweep"]) as f:
        for line in f:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, _, options = line.strip().partition(" ")
            path = os.path.join(cfg["runs"], name)
            if not os.path.exists(path + ".json"):
                print(f"| {name} | `{options.strip()}` | not run | | | | | | |")
                continue
            with open(path + ".json") as g:
                r = json.load(g)
            minutes = ""
            if os.path.exists(path + ".time"):
                with open(path + ".time") as g:
                    minutes = f"{float(g.read()) / 60:.1f}"
            gmm = f"{r['gmm_fid']:.1f}" if r.get("gmm_fid") is not None else ""
            print(f"| {name} | `{options.strip()}` | {r['fid']:.1f} | {r['is']:.2f} | {r['coverage']:.1f} | {gmm} | "
                  f"{r['mse']:.5f} | {r['mmd_prior']:.1e} | {minutes} |")


if __name__ == "__main__":
    run(main)
