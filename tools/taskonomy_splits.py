"""Turn an official Taskonomy split table into the building lists modsquad reads.

The Taskonomy / omnidata split tables (`train_val_test_{tiny,medium,full,fullplus}.csv`) have one row per building:
`name,is_train,is_val,is_test` with 0/1 flags (an optional header row is skipped). A table with a `split` column
(`name,split` with train/val/test values) works too.

    python tools/taskonomy_splits.py train_val_test_medium.csv --set medium
    # -> data/splits/taskonomy_medium_{train,val,test}.txt, then: build_dataset(..., split_set="medium")
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from modsquad.core.atomic import atomic_write

SPLITS = ("train", "val", "test")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "splits"


def read_split_table(path: str | Path) -> dict[str, list[str]]:
    """split -> building names, in table order."""
    rows = [[c.strip() for c in r] for r in csv.reader(Path(path).read_text().splitlines()) if any(r)]
    if not rows:
        raise ValueError(f"{path}: empty split table")
    header = [c.lower() for c in rows[0]]
    flags = {"0", "1", "train", "val", "test"}
    if not set(rows[0][1:]) <= flags:  # a header row
        rows = rows[1:]
    else:
        header = []
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    if "split" in header:
        col = header.index("split")
        for r in rows:
            if r[col].lower() not in out:
                raise ValueError(f"{path}: unknown split {r[col]!r} for building {r[0]!r}")
            out[r[col].lower()].append(r[0])
        return out
    cols = {s: next((i for i, h in enumerate(header) if s in h), 1 + k) for k, s in enumerate(SPLITS)}
    for r in rows:
        if len(r) < 4:
            raise ValueError(f"{path}: row {r} should be name,is_train,is_val,is_test")
        for s, i in cols.items():
            if r[i] == "1":
                out[s].append(r[0])
    return out


def write_split_lists(splits: dict[str, list[str]], split_set: str, out: str | Path = DEFAULT_OUT) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, names in splits.items():
        path = out / f"taskonomy_{split_set}_{s}.txt"
        text = "".join(f"{n}\n" for n in names)
        atomic_write(path, lambda p, text=text: p.write_text(text))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help="official split CSV, e.g. train_val_test_medium.csv")
    p.add_argument("--set", required=True, dest="split_set", help="name of the split set: tiny, medium, full, ...")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the lists (default: data/splits)")
    args = p.parse_args(argv)
    splits = read_split_table(args.table)
    for path in write_split_lists(splits, args.split_set, args.out):
        print(f"{path}: {len(path.read_text().split())} buildings")


if __name__ == "__main__":
    main()
