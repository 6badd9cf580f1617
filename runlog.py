"""What a run reports: {out_dir}/log.csv (a row per epoch), the epoch's line, and {out_dir}/losses.png."""
import csv
import os

from cli import atomic_write


def row(epoch, step, seconds, train, test):
    """A log.csv row: the epoch (fractional where max_steps ends one early), and the train and test means."""
    return {"epoch": f"{epoch:.4g}", "step": step, "seconds": f"{seconds:.1f}",
            **{f"train_{k}": f"{v:.6g}" for k, v in train.items()},
            **{f"test_{k}": f"{v:.6g}" for k, v in test.items()}}


def write(path, rows, terms):
    fields = ["epoch", "step", "seconds", *(f"{split}_{k}" for split in ("train", "test") for k in ("loss",
            *terms)),
              "test_mse"]
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)


def read(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def epoch_line(epoch, shown, test, seconds, seconds_left):
    """'epoch N: train loss ... (terms) | test recon, mmd, mse | time, about M min left'; `shown` from
    train.shown_terms. tqdm's bar shows only the epoch's own time, so the line gives the run's."""
    shown = dict(shown)
    left = "" if seconds_left <= 0 else (f", about {seconds_left:.0f}s left" if seconds_left < 90
                                         else f", about {seconds_left / 60:.0f} min left")
    return (f"epoch {epoch}: train loss {shown.pop('loss')} "
            f"({', '.join(f'{k} {v}' for k, v in shown.items())})"
            f" | test recon {test['recon']:.2f}, mmd {test['mmd']:.2e}, mse {test['mse']:.5f} | "
            f"{seconds:.0f}s"
            + left)


def plot(rows, path):
    import matplotlib  # imported here: only the end of a run draws
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [float(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    titles = ("reconstruction (nats / image)", "MMD^2(q(z), p(z))", "test MSE per pixel")
    for ax, term, title in zip(axes, ("recon", "mmd", "mse"), titles):
        for split in ("train", "test"):
            key = f"{split}_{term}"
            if key in rows[0] and rows[0][key] != "":
                ax.plot(epochs, [float(r[key]) for r in rows], marker="o", label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    axes[1].set_yscale("symlog", linthresh=1e-4)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
