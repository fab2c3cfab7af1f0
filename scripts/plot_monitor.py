"""Plot a run's monitor scores (train.eval_every) beside its loss: python scripts/plot_monitor.py RUN OUT.png"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(run: str, out: str) -> None:
    rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    scored = [r for r in rows if any(k.startswith("monitor/") for k in r)]
    keys = sorted({k for r in scored for k in r if k.startswith("monitor/") and k.endswith(("top1", "R@1"))})
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="k")
    left.set(xlabel="step", ylabel="weighted loss", title="training loss")
    for k in keys:
        right.plot([r["step"] for r in scored if k in r], [r[k] for r in scored if k in r], marker="o",
                   label=k.removeprefix("monitor/"))
    right.set(xlabel="step", ylabel="score (val split)", title="monitors (train.eval_every)")
    right.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
