"""Summarise examples/hf_continue.sh's evals.tsv: mean +- std over seeds per arm, and the
paired (same seed) difference of each arm to its control, on KJV (held out) and BBE.

Usage: python examples/hf_continue_report.py WORKDIR/evals.tsv
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ARMS = ["plain", "full", "full-noinfo", "full-demo", "adapter", "adapter-noinfo", "adapter-demo"]
# arm -> the control it is compared with, seed by seed
PAIRS = {
    "full": "plain", "full-noinfo": "plain", "full-demo": "plain",
    "adapter-noinfo": "adapter", "adapter-demo": "adapter",
}  # fmt: skip


def main(path: str) -> None:
    loss: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    base: dict[str, float] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        run, data, js = line.rstrip("\n").split("\t")
        value = json.loads(js)["val_loss"]
        text = data.split(":")[-1].upper()
        m = re.search(r"runs/(.+)-s(\d+)$", run)
        if m is None:
            base[text] = value
            continue
        loss[(m.group(1), text)][int(m.group(2))] = value

    def fmt(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        return f"{statistics.mean(values):.4f} ± {sd:.4f}"

    texts = ["KJV", "BBE"]
    print("| arm | seeds | " + " | ".join(f"{t} val loss | vs control" for t in texts) + " |")
    print("| --- | ---: | " + " | ".join("---: | ---:" for _ in texts) + " |")
    print(
        "| pretrained base (no further training) | - | "
        + " | ".join(f"{base.get(t, float('nan')):.4f} | " for t in texts)
        + " |"
    )
    for arm in ARMS:
        cells = []
        seeds = sorted(loss.get((arm, "KJV"), {}))
        if not seeds:
            continue
        for t in texts:
            vals = loss.get((arm, t), {})
            if any(s not in vals for s in seeds):
                cells.append("- | ")
                continue
            cell = fmt([vals[s] for s in seeds])
            ctrl = PAIRS.get(arm)
            diff = ""
            if ctrl and (ctrl, t) in loss:
                common = [s for s in seeds if s in loss[(ctrl, t)]]
                d = [vals[s] - loss[(ctrl, t)][s] for s in common]
                diff = f"{fmt(d)} (vs {ctrl})" if d else ""
            cells.append(f"{cell} | {diff}")
        print(f"| {arm} | {len(seeds)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
