"""A robust ImageNet-layout (ImageFolder) reader.

Layout: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (val sorted into class folders,
as the usual ``valprep.sh`` does). Class indices come from the sorted class folder names of
``train/``; ``val/`` uses the same mapping.

Bad data
--------
Images are decoded by content (a PNG named ``.JPEG`` is fine) and converted to RGB (grayscale,
CMYK, palette, RGBA all work). A file that cannot be decoded (zero bytes, truncated, not an image)
raises :class:`BadImageError` naming the file, never a bare PIL traceback. With
``skip_bad_images=True`` (the default) bad files are skipped instead:

* ``scan_bad_images=True`` decodes every file once when the dataset is built (in the main process,
  a few threads): bad files are logged (``logging.warning``, one line per path), listed in
  ``dataset.bad_files`` and removed from ``dataset.samples``, so ``len(dataset)`` and the count are
  exact. The default ``None`` scans when the split has at most ``SCAN_AUTO_MAX_FILES`` files (the
  demo data, tests), and not for full ImageNet.
* otherwise files are checked lazily in ``__getitem__``: a bad file is logged and the next sample is
  returned instead. DataLoader workers are separate processes, so their ``bad_files`` lists never
  reach the main process; pass ``bad_files_log=<path>`` to have every process append
  ``path<TAB>reason`` lines to a shared file, and read them with :func:`read_bad_files_log` (the
  loop can report the total at the end of a run).

With ``skip_bad_images=False`` the first bad file stops the run with :class:`BadImageError`.
"""
from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dyrelu.errors import CorruptDataError, MissingPathError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = "root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG"
SYNSET_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")
SCAN_AUTO_MAX_FILES = 20_000


class DatasetRootError(MissingPathError, ValueError):
    """The dataset folder is missing or not laid out as expected (catch as FileNotFoundError or
    ValueError)."""


DatasetLayoutError = DatasetRootError  # alias


class BadImageError(CorruptDataError, RuntimeError):
    """An image file that cannot be decoded. ``.path`` and ``.reason`` say which and why."""

    def __init__(self, path: Union[str, os.PathLike], reason: str = ""):
        self.path = str(path)
        self.reason = reason
        # one-argument form: DataLoader workers re-raise as BadImageError(<formatted message>)
        super().__init__(f"bad image file {self.path}: {reason}" if reason else self.path)

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


def _layout_error(msg: str) -> DatasetRootError:
    return DatasetRootError(f"{msg}. Expected the ImageNet layout {LAYOUT}")


def _is_image_name(name: str, extensions: Sequence[str]) -> bool:
    return not name.startswith(".") and name.lower().endswith(tuple(extensions))


def find_classes(split_dir: Union[str, Path]) -> List[str]:
    """Sorted names of the (non-hidden) sub-folders of ``split_dir``."""
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _has_image(d: Union[str, Path], extensions: Sequence[str]) -> bool:
    with os.scandir(d) as it:
        return any(e.is_file() and _is_image_name(e.name, extensions) for e in it)


def _check_split(root: Path, split: str, extensions: Sequence[str]) -> List[str]:
    d = root / split
    if not d.is_dir():
        raise _layout_error(f"dataset root {root} has no '{split}' folder ({d} is missing)")
    classes = find_classes(d)
    if not classes:
        hint = (" (it holds images directly: sort them into one folder per class, e.g. with ImageNet's valprep.sh)"
                if _has_image(d, extensions) else "")
        raise _layout_error(f"{d} has no class folders{hint}")
    if not any(_has_image(d / c, extensions) for c in classes):
        raise _layout_error(f"{d} has class folders but no images (extensions {', '.join(extensions)})")
    return classes


def check_imagenet_root(root: Union[str, os.PathLike, None], splits: Sequence[str] = ("train", "val"),
                        extensions: Sequence[str] = IMG_EXTENSIONS) -> List[str]:
    """Validate an ImageNet-layout root and return the class names (sorted folders of train/,
    or of the first split given).

    Raises :class:`DatasetRootError` (a FileNotFoundError and a ValueError) naming the path and
    the expected layout when the root is unset, missing, empty, lacks a split folder, has no class
    folders or no images, or when val/ has a class folder that train/ lacks.
    """
    if root is None or str(root).strip() == "":
        raise _layout_error("dataset root is not set (data.root is empty)")
    root = Path(root).expanduser()
    if not root.exists():
        raise _layout_error(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise _layout_error(f"dataset root {root} is not a folder")
    if not any(True for _ in root.iterdir()):
        raise _layout_error(f"dataset root {root} is empty")
    per_split = {s: _check_split(root, s, extensions) for s in splits}
    ref_split = "train" if "train" in per_split else splits[0]
    ref = per_split[ref_split]
    known = set(ref)
    for s, classes in per_split.items():
        missing = [c for c in classes if c not in known]
        if missing:
            raise _layout_error(
                f"{root / s} has {len(missing)} class folder(s) that {root / ref_split} lacks "
                f"(e.g. {', '.join(missing[:5])}); both splits must use the same classes")
    return ref


def read_class_names(root: Union[str, Path], classes: Sequence[str]) -> List[str]:
    """Human-readable names from ``LOC_synset_mapping.txt`` / ``synset_words.txt`` in ``root`` (or
    its parent) when present ("<wnid> <name>" lines); the folder names otherwise."""
    root = Path(root)
    for d in (root, root.parent):
        for fname in SYNSET_FILES:
            f = d / fname
            if f.is_file():
                try:
                    mapping = {}
                    for line in f.read_text().splitlines():
                        parts = line.strip().split(maxsplit=1)
                        if parts:
                            mapping[parts[0]] = parts[1] if len(parts) > 1 else parts[0]
                    return [mapping.get(c, c) for c in classes]
                except (OSError, UnicodeDecodeError):
                    pass
    return list(classes)


def load_image(path: Union[str, os.PathLike], before_load: Optional[Callable[[Image.Image], None]] = None,
               data: Optional[bytes] = None) -> Image.Image:
    """Decode ``path`` fully and return an RGB PIL image; any failure is a :class:`BadImageError`.

    ``before_load(img)`` runs on the opened, not yet decoded image (its size and format are known):
    the uint8 pipeline sets a reduced JPEG decode there (``img.draft``). ``data``: the file's bytes,
    already read (by :func:`read_bytes`)."""
    path = str(path)
    try:
        if data is None and os.path.getsize(path) == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        with (io.BytesIO(data) if data is not None else open(path, "rb")) as f:
            # with before_load (the uint8 pipeline): the file in one read, which decodes ~10% faster
            # than PIL's reads of a few KB at a time
            img = Image.open(f if before_load is None or data is not None else io.BytesIO(f.read()))
            if before_load is not None:
                before_load(img)
            img.load()  # full decode: catches truncated files, not just bad headers
            if before_load is not None and img.mode == "RGB":
                return img  # the same pixels; convert() would copy them (the uint8 pipeline's time)
            return img.convert("RGB")
    except BadImageError:
        raise
    except MemoryError:
        raise
    except FileNotFoundError:
        raise BadImageError(path, "file not found (deleted while running?)") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image (PIL cannot identify the format)") from None
    except Exception as e:  # OSError (truncated), SyntaxError, ValueError, DecompressionBombError, ...
        raise BadImageError(path, f"{type(e).__name__}: {e}") from None


def read_bytes(path: Union[str, os.PathLike]) -> bytes:
    """The file's bytes; a missing or empty file is a :class:`BadImageError`."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadImageError(path, "file not found (deleted while running?)") from None
    except OSError as e:
        raise BadImageError(path, f"{type(e).__name__}: {e}") from None
    if not data:
        raise BadImageError(path, "empty file (0 bytes)")
    return data


def read_bad_files_log(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """{path: reason} from a ``bad_files_log`` file (empty if it does not exist)."""
    out: Dict[str, str] = {}
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                p, _, reason = line.rstrip("\n").partition("\t")
                if p:
                    out.setdefault(p, reason)
    except FileNotFoundError:
        pass
    return out


class RobustImageFolder(Dataset):
    """ImageFolder over ``<root>/<split>/<class>/*`` that survives bad files (see module doc).

    Attributes (torchvision ImageFolder-compatible): ``classes``, ``class_to_idx``, ``samples``
    (list of (path, target)), ``targets``, ``imgs``; plus ``class_names`` (human-readable when a
    synset mapping file exists), ``bad_files`` (paths found bad in THIS process) and
    ``bad_file_reasons`` ({path: reason}).
    """

    def __init__(self, root: Union[str, os.PathLike], split: str = "train", transform: Optional[Callable] = None,
                 skip_bad_images: bool = True, scan_bad_images: Optional[bool] = None,
                 class_to_idx: Optional[Dict[str, int]] = None, target_transform: Optional[Callable] = None,
                 extensions: Sequence[str] = IMG_EXTENSIONS, bad_files_log: Union[str, os.PathLike, None] = None,
                 max_consecutive_bad: int = 64, scan_threads: int = 4, reader: Optional[Callable[[str], object]] = None):
        if root is None or str(root).strip() == "":
            raise _layout_error("dataset root is not set (data.root is empty)")
        self.root = Path(root).expanduser()
        self.split = split
        self.split_dir = self.root / split
        self.transform = transform
        # reader(path) -> sample replaces load_image + transform (data/feeding.py: the uint8 and
        # GPU-decode pipelines decode, or only read, the file their own way); it raises BadImageError
        self.reader = reader
        self.target_transform = target_transform
        self.skip_bad_images = bool(skip_bad_images)
        self.extensions = tuple(e.lower() for e in extensions)
        self.bad_files_log = str(bad_files_log) if bad_files_log else None
        self.max_consecutive_bad = int(max_consecutive_bad)
        self.bad_files: List[str] = []
        self.bad_file_reasons: Dict[str, str] = {}

        if class_to_idx is None:
            splits = ("train",) if split == "train" else ("train", split)
            classes = check_imagenet_root(self.root, splits=splits, extensions=self.extensions)
            class_to_idx = {c: i for i, c in enumerate(classes)}
        else:
            check_imagenet_root(self.root, splits=(split,), extensions=self.extensions)
            missing = [c for c in find_classes(self.split_dir) if c not in class_to_idx]
            if missing:
                raise _layout_error(f"{self.split_dir} has class folder(s) not in the given class mapping "
                                    f"(e.g. {', '.join(missing[:5])})")
        self.class_to_idx = dict(class_to_idx)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.get)
        self.class_names = read_class_names(self.root, self.classes)
        self.samples = self._make_samples()
        if not self.samples:
            raise _layout_error(f"{self.split_dir} contains no images")

        if scan_bad_images is None:
            scan_bad_images = len(self.samples) <= SCAN_AUTO_MAX_FILES
        self.scanned = bool(scan_bad_images)
        if self.scanned:
            self._scan(scan_threads)

    # -- listing ------------------------------------------------------------------------------
    def _make_samples(self) -> List[Tuple[str, int]]:
        samples = []
        for c in find_classes(self.split_dir):
            t = self.class_to_idx[c]
            d = self.split_dir / c
            with os.scandir(d) as it:
                names = sorted(e.name for e in it if _is_image_name(e.name, self.extensions) and e.is_file())
            samples.extend((str(d / n), t) for n in names)
        return samples

    @property
    def targets(self) -> List[int]:
        return [t for _, t in self.samples]

    @property
    def imgs(self) -> List[Tuple[str, int]]:
        return self.samples

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_bad_files(self) -> int:
        return len(self.bad_files)

    # -- bad files ----------------------------------------------------------------------------
    def _record_bad(self, path: str, reason: str) -> None:
        if path in self.bad_file_reasons:
            return
        self.bad_files.append(path)
        self.bad_file_reasons[path] = reason
        log.warning("skipping bad image %s (%s)", path, reason)
        if self.bad_files_log:
            try:  # one short O_APPEND write per line: safe from several worker processes
                fd = os.open(self.bad_files_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, f"{path}\t{reason}\n".encode("utf-8", "replace"))
                finally:
                    os.close(fd)
            except OSError as e:
                log.warning("could not append to bad_files_log %s: %s", self.bad_files_log, e)

    def _scan(self, threads: int) -> None:
        def check(sample):
            try:
                load_image(sample[0])
                return None
            except BadImageError as e:
                return e

        with ThreadPoolExecutor(max_workers=max(1, int(threads))) as pool:
            errors = list(pool.map(check, self.samples))
        bad = [e for e in errors if e is not None]
        if not bad:
            return
        if not self.skip_bad_images:
            first = bad[0]
            more = f" (and {len(bad) - 1} more bad file(s) in {self.split_dir})" if len(bad) > 1 else ""
            raise BadImageError(first.path, first.reason + more)
        for e in bad:
            self._record_bad(e.path, e.reason)
        self.samples = [s for s, e in zip(self.samples, errors) if e is None]
        log.warning("%s: skipped %d bad image(s) of %d; %d remain",
                    self.split_dir, len(bad), len(errors), len(self.samples))
        if not self.samples:
            raise _layout_error(f"{self.split_dir}: every image is unreadable ({len(bad)} bad files)")

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        n = len(self.samples)
        tries = min(n, max(1, self.max_consecutive_bad))
        for k in range(tries):
            path, target = self.samples[(index + k) % n]
            if path in self.bad_file_reasons:
                continue
            try:
                img = self.reader(path) if self.reader is not None else load_image(path)
            except BadImageError as e:
                if not self.skip_bad_images:
                    raise
                self._record_bad(path, e.reason)
                continue
            if self.transform is not None and self.reader is None:
                img = self.transform(img)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return img, target
        raise RuntimeError(f"{tries} consecutive unreadable images starting at {self.samples[index % n][0]} "
                           f"(is {self.split_dir} corrupted?)")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"classes={len(self.classes)}, bad_files={len(self.bad_files)}, scanned={self.scanned})")
