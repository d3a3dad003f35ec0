"""What an ImageFolder tree holds, checked up front: splits, classes and counts, image sizes and modes, and every
file that cannot be used (corrupt, empty, unreadable, not an image), so a run never trips over one mid-way.

Layout: root/<split>/<class>/<image> (ImageNet's). `usp init` and `usp demo --data` print `ScanReport.table()`
and write `ScanReport.bad_files` to a list that the recipes name as `data.exclude`: bad files are listed, never
skipped silently.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from usp.data.images import IMAGE_EXTENSIONS

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")  # searched in this order for the eval split
_EXTENSIONS = {e.lower() for e in IMAGE_EXTENSIONS}


@dataclass
class SplitScan:
    name: str
    classes: dict[str, int] = field(default_factory=dict)  # class -> usable images
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    modes: Counter = field(default_factory=Counter)  # PIL mode -> images

    @property
    def images(self) -> int:
        return sum(self.classes.values())

    @property
    def empty_classes(self) -> list[str]:
        return [name for name, count in self.classes.items() if count == 0]


@dataclass
class ScanReport:
    root: Path
    splits: dict[str, SplitScan]
    bad_files: list[tuple[Path, str]]  # (path, why)
    skipped: list[Path]  # files that are not images by extension (listed, e.g. README.txt)

    @property
    def classes(self) -> list[str]:
        """The class names of the training split (the label order: sorted, as ImageFolderDataset numbers them)."""
        return sorted(self.splits[self.train_split].classes)

    @property
    def train_split(self) -> str:
        return "train" if "train" in self.splits else next(iter(self.splits))

    @property
    def eval_split(self) -> str:
        """The first of val, valid, validation, test present; the training split when there is no other."""
        return next((s for s in SPLIT_NAMES[1:] if s in self.splits), self.train_split)

    @property
    def empty_classes(self) -> list[str]:
        return sorted({f"{s.name}/{c}" for s in self.splits.values() for c in s.empty_classes})

    def smallest_side(self) -> int:
        sides = [min(size) for s in self.splits.values() for size in s.sizes]
        return min(sides) if sides else 0

    def table(self) -> str:
        """A plain-text summary for the terminal and the report."""
        lines = [f"data: {self.root}", f"{'split':<12} {'classes':>7} {'images':>8}  sizes (w×h: count)  modes"]
        for s in self.splits.values():
            sizes = ", ".join(f"{w}×{h}: {n}" for (w, h), n in s.sizes.most_common(3))
            more = " ..." if len(s.sizes) > 3 else ""
            modes = ", ".join(f"{m}: {n}" for m, n in s.modes.most_common())
            lines.append(f"{s.name:<12} {len(s.classes):>7} {s.images:>8}  {sizes}{more}  {modes}")
        train = self.splits[self.train_split]
        lines.append("classes (train images): " + ", ".join(f"{c} ({n})" for c, n in sorted(train.classes.items())))
        lines.append(f"empty classes: {', '.join(self.empty_classes) or 'none'}")
        lines.append(f"bad files ({len(self.bad_files)}, left out of every run through data.exclude):"
                     + ("" if self.bad_files else " none"))
        lines += [f"  {path}: {why}" for path, why in self.bad_files]
        if self.skipped:
            lines.append(f"not images by extension ({len(self.skipped)}, ignored): "
                         + ", ".join(str(p) for p in self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else ""))
        return "\n".join(lines)

    def write_exclude(self, path: str | os.PathLike) -> Path:
        """The bad files, one absolute path a line, for `data.exclude` (a `#` line says why each is there)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["# images usp leaves out (written by `usp init`; delete a line to use the file again)"]
        lines += [f"{p.resolve()}  # {why}" for p, why in self.bad_files]
        path.write_text("\n".join(lines) + "\n")
        return path


def _check(path: Path) -> tuple[tuple[int, int], str] | str:
    """((width, height), mode) of a usable image, or why it is not usable."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            image.load()  # decodes the pixels: a truncated or corrupt file fails here, not mid-training
            return image.size, image.mode
    except PermissionError as err:
        return f"unreadable: {err.strerror}"
    except Exception as err:  # PIL raises several types for broken files
        return f"corrupt: {type(err).__name__}: {err}"


def scan_image_folder(root: str | os.PathLike) -> ScanReport:
    """Open every image of root/<split>/<class>/ once. Raises a ValueError naming the layout when it is not one."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist; give the folder holding train/ (and val/)")
    split_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_dirs = [d for d in split_dirs if any(c.is_dir() for c in d.iterdir())]
    if not split_dirs and any(p.suffix.lower() in _EXTENSIONS for d in root.iterdir() if d.is_dir()
                              for p in d.iterdir()):
        raise ValueError(f"{root} looks like one split (its folders hold images): give the folder above it, which "
                         f"holds train/ and val/ (each with one folder per class)")
    if not split_dirs:
        raise ValueError(f"{root} has no split folders with class folders; expected {root}/train/<class>/<image> "
                         f"(and {root}/val/<class>/<image>)")
    order = {name: i for i, name in enumerate(SPLIT_NAMES)}
    split_dirs.sort(key=lambda d: (order.get(d.name, len(order)), d.name))
    splits, bad, skipped = {}, [], []
    for split_dir in split_dirs:
        scan = SplitScan(split_dir.name)
        for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")):
            count = 0
            for file in sorted(p for p in class_dir.rglob("*") if p.is_file()):
                if file.suffix.lower() not in _EXTENSIONS:
                    skipped.append(file)
                    continue
                result = _check(file)
                if isinstance(result, str):
                    bad.append((file, result))
                    continue
                size, mode = result
                scan.sizes[size] += 1
                scan.modes[mode] += 1
                count += 1
            scan.classes[class_dir.name] = count
        splits[split_dir.name] = scan
    report = ScanReport(root, splits, bad, skipped)
    names = {name: set(scan.classes) for name, scan in splits.items()}
    train_names = names[report.train_split]
    for name, classes in names.items():
        if classes != train_names:
            # ImageFolderDataset numbers the class folders of each split on its own: a missing folder shifts labels.
            raise ValueError(f"{root}/{name} has class folders {sorted(classes ^ train_names)} that "
                             f"{root}/{report.train_split} has not (or the reverse); labels would not match across "
                             "splits: create the missing (even empty) class folders")
    if report.splits[report.train_split].images == 0:
        raise ValueError(f"{root}/{report.train_split} holds no readable images; see the bad files:\n{report.table()}")
    return report

