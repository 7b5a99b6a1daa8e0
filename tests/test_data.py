import numpy as np
import pytest
import torch
from PIL import Image

from fedsynth.config import DataConfig
from fedsynth.core.errors import DataError
from fedsynth.data.datasets import load_dataset, load_images, stratified_split


def test_digits_shape_range_and_split():
    split = load_dataset(DataConfig())
    full = split.full
    assert full.images.shape == (1797, 1, 16, 16)
    assert full.images.min() >= -1 and full.images.max() <= 1
    assert full.images.min() == -1 and full.images.max() > 0.9
    assert full.class_names == tuple("0123456789")
    assert set(split.train_indices).isdisjoint(split.test_indices)
    assert len(split.train_indices) + len(split.test_indices) == 1797
    # stratified: every class in the test split at about 20%
    test_counts = np.bincount(full.labels.numpy()[split.test_indices], minlength=10)
    assert (np.abs(test_counts / full.class_counts() - 0.2) < 0.01).all()
    again = load_dataset(DataConfig())
    assert np.array_equal(again.test_indices, split.test_indices)


def test_split_is_seeded():
    labels = np.repeat(np.arange(3), 10)
    a = stratified_split(labels, 0.3, seed=1)
    b = stratified_split(labels, 0.3, seed=1)
    c = stratified_split(labels, 0.3, seed=2)
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])
    assert len(a[1]) == 9


def _write_folder(root, classes, mode="L", size=(10, 12)):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(3):
            color = (i * 40, 0, 200) if mode == "RGB" else i * 40
            Image.new(mode, size, color=color).save(root / c / f"{i}.png")


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3)])
def test_imagefolder_gray_and_rgb(tmp_path, mode, channels):
    _write_folder(tmp_path, ["cat", "dog"], mode=mode)
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_images(DataConfig(dataset="imagefolder", path=str(tmp_path), image_size=8))
    assert data.images.shape == (6, channels, 8, 8)
    assert data.class_names == ("cat", "dog")
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.isclose(data.images[0].min(), torch.tensor(-1.0))


def test_imagefolder_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"image folder not found: .*nowhere"):
        load_images(DataConfig(dataset="imagefolder", path=str(tmp_path / "nowhere")))


def test_imagefolder_empty_class_names_folder(tmp_path):
    _write_folder(tmp_path, ["a"])
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder has no images: .*/b$"):
        load_images(DataConfig(dataset="imagefolder", path=str(tmp_path)))


def test_imagefolder_no_classes(tmp_path):
    with pytest.raises(DataError, match="no class sub-folders"):
        load_images(DataConfig(dataset="imagefolder", path=str(tmp_path)))


def test_imagefolder_unreadable_image_names_file(tmp_path):
    _write_folder(tmp_path, ["a"])
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"unreadable image .*broken\.png"):
        load_images(DataConfig(dataset="imagefolder", path=str(tmp_path)))


def test_npz_layouts_and_names(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, images=imgs, labels=np.array([0, 1, 2, 0, 1, 2]), class_names=np.array(["x", "y", "z"]))
    data = load_images(DataConfig(dataset="npz", path=str(path), image_size=8))
    assert data.images.shape == (6, 3, 8, 8) and data.class_names == ("x", "y", "z")
    gray = tmp_path / "g.npz"
    np.savez(gray, images=np.zeros((4, 8, 8), dtype=np.float32), labels=np.array([0, 1, 0, 1]))
    data = load_images(DataConfig(dataset="npz", path=str(gray), image_size=8))
    assert data.images.shape == (4, 1, 8, 8) and data.class_names == ("0", "1")


def test_npz_count_mismatch_names_file(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((4, 8, 8), dtype=np.uint8), labels=np.array([0, 1, 0]))
    with pytest.raises(DataError, match=r"bad\.npz: 4 images but 3 labels"):
        load_images(DataConfig(dataset="npz", path=str(path)))


def test_npz_missing_array_and_file(tmp_path):
    path = tmp_path / "nolabels.npz"
    np.savez(path, images=np.zeros((4, 8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match=r"nolabels\.npz: missing array\(s\) \['labels'\]"):
        load_images(DataConfig(dataset="npz", path=str(path)))
    with pytest.raises(DataError, match="npz file not found"):
        load_images(DataConfig(dataset="npz", path=str(tmp_path / "x.npz")))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"unreadable npz file .*junk\.npz"):
        load_images(DataConfig(dataset="npz", path=str(junk)))


def test_npz_float_out_of_range(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, images=np.full((2, 4, 4), 3.0, dtype=np.float32), labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"f\.npz: float 'images' must be finite and in \[0, 1\]"):
        load_images(DataConfig(dataset="npz", path=str(path)))


def _npz(path, labels, names):
    np.savez(path, images=np.zeros((len(labels), 8, 8), np.uint8), labels=np.array(labels), class_names=names)
    return DataConfig(dataset="npz", path=str(path), image_size=8)


@pytest.mark.parametrize(
    ("names", "labels", "message"),
    [
        (["a", "a"], [0, 1], r"class names 'a' and 'a' would share one folder"),
        (["Cat", "cat"], [0, 1], r"class names 'Cat' and 'cat' would share one folder"),
        (["a/b", "a:b"], [0, 1], r"class names 'a/b' and 'a:b' would share one folder"),
        (["", "b"], [0, 1], r"class name '' gives no usable folder name"),
        (["..", "b"], [0, 1], r"class name '\.\.' gives no usable folder name"),
        (["a", "b", "c"], [0, 2, 0], r"classes \['b'\] have no images \(labels must be 0\.\.K-1, no gaps\)"),
    ],
)
def test_npz_class_names_and_labels_are_checked_up_front(tmp_path, names, labels, message):
    with pytest.raises(DataError, match=message) as err:
        load_images(_npz(tmp_path / "d.npz", labels, np.array(names)))
    assert "\n" not in str(err.value)


def test_class_names_become_safe_folders_inside_the_output(tmp_path):
    from fedsynth.data.datasets import folder_name
    from fedsynth.evaluation.evaluate import load_synthetic
    from fedsynth.stages.synthetic_set import SetLayout, SetWriter

    names = ["../escape", "/abs/olute", "T-shirt/top", ".hidden", "ok"]
    assert [folder_name(n) for n in names] == ["_escape", "_abs_olute", "T-shirt_top", "hidden", "ok"]
    real = load_images(_npz(tmp_path / "d.npz", [0, 1, 2, 3, 4], np.array(names)))
    out = tmp_path / "run" / "synthetic"
    out.mkdir(parents=True)
    layout = SetLayout(list(real.class_names), len(real.images), tuple(real.images.shape[1:]))
    writer = SetWriter(out, layout)
    writer.add(real.images, real.labels)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    assert all(p.parts[:2] == ("run", "synthetic") and len(p.parts) == 4 for p in written), written
    fake = load_synthetic(out, real, image_size=8)  # read back under the real class names
    assert torch.equal(fake.labels.sort().values, real.labels)


def test_sixteen_bit_gray_pngs_are_scaled_by_their_depth_not_saturated(tmp_path):
    """Pillow clips 16-bit values at 255 when converting to "L": a dark 16-bit image would load
    nearly all white. Loaded values must be the source's / 65535 (to 8-bit rounding)."""
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(ramp).save(tmp_path / cls / "x.png")  # mode I;16
    data = load_images(DataConfig(dataset="imagefolder", path=str(tmp_path), image_size=16))
    got = (data.images[0, 0].numpy() + 1) / 2  # back to [0, 1]
    assert np.abs(got - ramp / 65535).max() <= 1 / 255 + 1e-6
    assert (got >= 0.999).mean() < 0.01  # Pillow's own conversion: most pixels at the maximum


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90° clockwise to view)."""
    stored = np.zeros((8, 16), dtype=np.uint8)  # 8 high, 16 wide
    stored[:, :8] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(stored).save(tmp_path / cls / "x.png", exif=exif)
    data = load_images(DataConfig(dataset="imagefolder", path=str(tmp_path), image_size=16))
    viewed = data.images[0, 0].numpy() > 0  # rotated 90° clockwise: the white half is on top
    assert viewed[:6].all() and not viewed[10:].any()
