"""The run folder `{project}/{name}/`: args.yaml, results.csv (per epoch), steps.csv (per optimizer step: the losses,
lr and grad norm, then images/s, step time, data wait, the peak memory over ranks and each rank's, in MiB).

Only rank 0 writes; every other rank gets a RunLog that does nothing, so callers never check the rank.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RunLog", "STEP_COLUMNS", "PER_RANK"]

STEP_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "images_per_s", "step_s", "data_s", "peak_mib")
"""The columns every run writes; the loss items of the model's task (box_loss, seg_loss, ...) follow `loss`."""
PER_RANK = "peak_mib_rank"


class RunLog:
    def __init__(self, folder: Path, *, writer: bool):
        self.folder = Path(folder)
        self.writer = writer
        self._headers: dict[str, list[str]] = {}

    @staticmethod
    def new_folder(project: str, name: str, exist_ok: bool) -> Path:
        """Ultralytics' naming (its increment_path): train, train-2, train-3 ... unless exist_ok reuses the name."""
        from ultralytics.utils.files import increment_path

        return Path(increment_path(Path(project) / name, exist_ok=exist_ok))

    def write_args(self, args: dict[str, Any]) -> None:
        if self.writer:
            (self.folder / "weights").mkdir(parents=True, exist_ok=True)
            (self.folder / "args.yaml").write_text(yaml.safe_dump(args, sort_keys=False))

    def rewind(self, *, step: int, epochs: int) -> None:
        """Keep only the rows up to optimizer step `step` and the first `epochs` epochs: a run resumed or restarted
        from a checkpoint logs the steps after it again, and each must appear once."""
        for file, column, last in (("steps.csv", "step", step), ("results.csv", "epoch", epochs)):
            path = self.folder / file
            if not self.writer or not path.exists():
                continue
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            index = rows[0].index(column) if rows and column in rows[0] else None
            kept = rows[:1] + [r for r in rows[1:] if index is not None and int(float(r[index])) <= last]
            if len(kept) == 1:
                path.unlink()  # a fresh header comes with the first row
            elif kept != rows:
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerows(kept)

    def step(self, row: dict[str, Any], *, losses: tuple[str, ...]) -> None:
        """One optimizer step's row: STEP_COLUMNS with the `losses` items after `loss`, then each rank's peak."""
        columns = (*STEP_COLUMNS[:3], *losses, *STEP_COLUMNS[3:])
        self._append("steps.csv", {**{k: row.get(k, "") for k in columns},
                                   **{k: v for k, v in row.items() if k.startswith(PER_RANK)}})

    def epoch(self, row: dict[str, Any]) -> None:
        self._append("results.csv", row)

    def _append(self, file: str, row: dict[str, Any]) -> None:
        if not self.writer:
            return
        path = self.folder / file
        new = not path.exists()
        if file not in self._headers:  # a resumed run appends under the header its file already has
            self._headers[file] = (_header_of(path) if not new else None) or list(row)
        header = self._headers[file]
        with open(path, "a", newline="") as f:
            out = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
            if new:
                out.writeheader()
            out.writerow({k: _fmt(row.get(k, "")) for k in header})


def _header_of(path: Path) -> list[str] | None:
    with open(path, newline="") as f:
        return next(csv.reader(f), None)


def _fmt(value: Any) -> Any:
    return f"{value:.9g}" if isinstance(value, float) else value
