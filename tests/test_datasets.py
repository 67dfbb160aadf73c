"""Data (docs/method.md): npz datasets and image folders read as uint8 (N,H,W,3), bad files fail naming the problem,
shadow sets are seeded samples, trigger and reference files round-trip, stamping touches only the trigger."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from datasets import (CLIP_NORMALIZATION, NORMALIZATION, DataError, load_image_folder, load_images, load_npz,
                      load_reference, load_trigger, pick_reference, save_npz_dataset, save_reference, save_trigger,
                      select_shadow, stamp, to_model_input, white_square_trigger)
from datasets.triggers import write_paper_triggers


def numbered_images(n: int, size: int = 8) -> np.ndarray:
    """uint8 (n,size,size,3) whose pixel [0,0,0] is the image's index: lets a test tell which images were picked."""
    x = np.random.default_rng(0).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    return x


def ids(images: np.ndarray) -> list[int]:
    return images[:, 0, 0, 0].tolist()


# --- npz datasets ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_shape", ["(N,1)", "(N,)"])
def test_npz_dataset_reads_both_label_shapes(label_shape, tmp_path):
    x = numbered_images(6)
    y = np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=y.reshape(-1, 1) if label_shape == "(N,1)" else y)
    got_x, got_y = load_npz(tmp_path / "d.npz")
    assert np.array_equal(got_x, x) and got_x.dtype == np.uint8
    assert got_y.tolist() == y.tolist() and got_y.shape == (6,) and got_y.dtype == np.int64


def test_npz_dataset_round_trips_and_labels_are_optional(tmp_path):
    x = numbered_images(4)
    save_npz_dataset(tmp_path / "unlabelled.npz", x)
    got_x, got_y = load_npz(tmp_path / "unlabelled.npz")
    assert np.array_equal(got_x, x) and got_y is None
    with pytest.raises(DataError, match="unlabelled.npz: has no labels 'y'"):
        load_npz(tmp_path / "unlabelled.npz", require_labels=True)


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 8, 8, 3), np.uint8)}, "has no array 'x'"),
    ({"x": np.zeros((2, 8, 8, 3), np.float32)}, "must be uint8 in \\[0,255\\], got dtype float32"),
    ({"x": np.zeros((2, 8, 8), np.uint8)}, "must have shape \\(N,H,W,3\\), got \\(2, 8, 8\\)"),
    ({"x": np.zeros((2, 3, 8, 8), np.uint8)}, "must have shape \\(N,H,W,3\\), got \\(2, 3, 8, 8\\)"),
    ({"x": np.zeros((0, 8, 8, 3), np.uint8)}, "contains no images"),
    ({"x": np.zeros((2, 8, 8, 3), np.uint8), "y": np.zeros(3)}, "3 labels for 2 images"),
])
def test_bad_npz_fails_with_data_error_naming_file_and_problem(arrays, message, tmp_path):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_npz(tmp_path / "bad.npz")
    assert str(tmp_path / "bad.npz") in str(info.value)


def test_missing_or_unreadable_npz_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.npz: no such file"):
        load_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="junk.npz: not a readable .npz"):
        load_npz(tmp_path / "junk.npz")


def test_load_images_checks_the_encoders_input_size(tmp_path):
    np.savez(tmp_path / "small.npz", x=numbered_images(3, 32))
    assert load_images(tmp_path / "small.npz", size=32).shape == (3, 32, 32, 3)
    with pytest.raises(DataError, match="images are 32x32 but the encoder expects 224x224"):
        load_images(tmp_path / "small.npz", size=224)


# --- image folders -----------------------------------------------------------------------------------------
PHOTO_SIZES = [(300, 350), (640, 427), (257, 300), (224, 224)]  # (w, h): odd margins test the crop rounding


def write_photos(folder, class_folders: bool):
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(PHOTO_SIZES):
        sub = folder / (f"n0{i % 2}" if class_folders else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{i}.{'png' if i % 2 else 'JPEG'}"
        shape = (h, w) if i == 3 else (h, w, 3)  # a greyscale file among colour ones, as ImageNet val has
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(path)
        paths.append(path)
    return sorted(paths)


@pytest.mark.parametrize("class_folders", [True, False])
def test_image_folder_is_resized_256_and_centre_cropped_224_like_torchvision(class_folders, tmp_path):
    paths = write_photos(tmp_path / "imgs", class_folders)
    images = load_image_folder(tmp_path / "imgs", size=224, progress=False)
    assert images.shape == (len(PHOTO_SIZES), 224, 224, 3) and images.dtype == np.uint8
    paper = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    for got, path in zip(images, paths):  # sorted file order
        with Image.open(path) as img:
            assert np.array_equal(got, np.asarray(paper(img.convert("RGB")))), path.name


def test_imagenet_root_reads_its_val_split_and_samples_by_seed(tmp_path):
    write_photos(tmp_path / "imagenet" / "val", class_folders=True)
    (tmp_path / "imagenet" / "train").mkdir()
    full = load_image_folder(tmp_path / "imagenet", size=32, progress=False)
    half = load_image_folder(tmp_path / "imagenet", size=32, fraction=0.5, seed=3, progress=False)
    assert full.shape == (4, 32, 32, 3) and half.shape == (2, 32, 32, 3)
    assert np.array_equal(half, load_image_folder(tmp_path / "imagenet", size=32, count=2, seed=3, progress=False))
    assert all(any(np.array_equal(h, f) for f in full) for h in half)


def test_image_folder_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such folder"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="a.jpg: not a readable image"):
        load_image_folder(tmp_path / "broken", progress=False)


# --- shadow sets -------------------------------------------------------------------------------------------
def test_shadow_by_count_and_fraction_is_a_seeded_sample_without_repeats():
    x = numbered_images(200)
    by_count = select_shadow(x, count=50, seed=80)
    assert len(by_count) == 50 and len(set(ids(by_count))) == 50
    assert all(np.array_equal(img, x[i]) for img, i in zip(by_count, ids(by_count)))  # whole, unaltered images
    assert ids(by_count) == ids(select_shadow(x, count=50, seed=80))
    assert ids(by_count) != ids(select_shadow(x, count=50, seed=81))
    assert len(select_shadow(x, fraction=0.2, seed=80)) == 40
    assert ids(select_shadow(x, fraction=0.25, seed=5)) == ids(select_shadow(x, count=50, seed=5))
    assert len(select_shadow(x)) == 200


def test_shadow_per_class_takes_the_first_images_of_each_class_as_the_paper():
    x = numbered_images(100)
    y = np.arange(100) % 4  # 25 per class
    shadow = select_shadow(x, y, per_class_fraction=0.1)  # ceil(2.5) = 3 per class
    expected = sorted(i for c in range(4) for i in np.flatnonzero(y == c)[:3])
    assert ids(shadow) == expected
    assert len(select_shadow(x, None, per_class_fraction=0.1, seed=1)) == 10  # no labels: same share at random


@pytest.mark.parametrize("kw", [{"count": 201}, {"count": 0}, {"fraction": 0.0}, {"fraction": 1.5}])
def test_impossible_shadow_size_is_rejected(kw):
    with pytest.raises(DataError, match="of 200 images"):
        select_shadow(numbered_images(200), **kw)


# --- triggers ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_k_axis", [True, False])
def test_trigger_file_round_trips_with_and_without_k_axis(with_k_axis, tmp_path):
    pattern, keep = white_square_trigger(32, 21, 10, with_k_axis=with_k_axis)
    save_trigger(tmp_path / "t.npz", pattern, keep, info=["white square"])
    trigger = load_trigger(tmp_path / "t.npz")
    assert trigger.pattern.shape == trigger.keep.shape == (1, 32, 32, 3) and len(trigger) == 1
    assert trigger.file_ndim == (4 if with_k_axis else 3) and trigger.info == ["white square"]
    assert np.array_equal(trigger.pattern.reshape(pattern.shape), pattern)


def test_trigger_with_integer_mask_and_several_triggers_is_read(tmp_path):
    p1, k1 = white_square_trigger(32, 0, 4, with_k_axis=False)
    p2, k2 = white_square_trigger(32, 28, 4, with_k_axis=False)
    np.savez(tmp_path / "two.npz", t=np.stack([p1, p2]), tm=np.stack([k1, k2]).astype(np.int64))
    trigger = load_trigger(tmp_path / "two.npz")
    assert len(trigger) == 2 and trigger.info == []
    x = np.zeros((1, 32, 32, 3), np.uint8)
    assert trigger.stamp(x, 1)[0, 28:, 28:].min() == 255 and trigger.stamp(x, 1)[0, :4, :4].max() == 0


@pytest.mark.parametrize("arrays, message", [({"t": np.zeros((8, 8, 3))}, "missing \\['tm'\\]"),
                                             ({"t": np.zeros((8, 8, 3)), "tm": np.ones((8, 8))}, "must both be")])
def test_bad_trigger_file_is_named(arrays, message, tmp_path):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_trigger(tmp_path / "bad.npz")
    assert str(tmp_path / "bad.npz") in str(info.value)


def test_paper_trigger_files_are_the_specified_white_squares(tmp_path):
    paths = write_paper_triggers(tmp_path)
    assert sorted(p.name for p in paths) == ["trigger_pt_white_173_50_ap_replace.npz",
                                            "trigger_pt_white_185_24.npz", "trigger_pt_white_21_10_ap_replace.npz"]
    expected = {"trigger_pt_white_21_10_ap_replace.npz": ((1, 32, 32, 3), 21, 10),
                "trigger_pt_white_173_50_ap_replace.npz": ((1, 224, 224, 3), 173, 50),
                "trigger_pt_white_185_24.npz": ((224, 224, 3), 185, 24)}  # the text-target file has no K axis
    for path in paths:
        shape, top, side = expected[path.name]
        with np.load(path) as data:
            t, tm = data["t"], data["tm"]
        assert t.shape == tm.shape == shape and t.dtype == tm.dtype == np.float64
        square = np.zeros(shape[-3:-1], bool)
        square[top:top + side, top:top + side] = True
        t, tm = t.reshape(shape[-3:]), tm.reshape(shape[-3:])
        assert (t[square] == 255).all() and (t[~square] == 0).all()
        assert (tm[square] == 0).all() and (tm[~square] == 1).all()


@pytest.mark.parametrize("as_tensor", [False, True])
def test_stamping_puts_the_pattern_exactly_where_the_mask_is_zero(as_tensor):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    keep = np.ones((32, 32, 3))
    keep[3:9, 20:30] = 0
    pattern = np.where(keep == 0, rng.integers(0, 256, size=(32, 32, 3)), 0).astype(np.float64)
    out = stamp(torch.from_numpy(x) if as_tensor else x, pattern, keep)
    out = out.numpy() if as_tensor else out
    assert out.dtype == np.uint8
    zero = keep == 0
    assert np.array_equal(out[:, zero], np.broadcast_to(pattern[zero], out[:, zero].shape).astype(np.uint8))
    assert np.array_equal(out[:, ~zero], x[:, ~zero])


# --- reference inputs ----------------------------------------------------------------------------------------
def test_reference_file_round_trips_with_info(tmp_path):
    x = numbered_images(3, 32)
    save_reference(tmp_path / "ref" / "truck.npz", x, np.array([[9], [9], [9]]), info=["truck"])
    got_x, got_y = load_reference(tmp_path / "ref" / "truck.npz")
    assert np.array_equal(got_x, x) and got_y.tolist() == [9, 9, 9] and got_y.dtype == np.int64
    with np.load(tmp_path / "ref" / "truck.npz") as data:
        assert data["info"].tolist() == ["truck"]


def test_pick_reference_draws_seeded_images_of_the_target_class_only(tmp_path):
    x = numbered_images(60)
    y = np.arange(60) % 10
    np.savez(tmp_path / "train.npz", x=x, y=y.reshape(-1, 1))
    ref_x, ref_y = pick_reference(tmp_path / "train.npz", label=9, count=3, seed=1)
    assert ref_y.tolist() == [9, 9, 9] and all(i % 10 == 9 for i in ids(ref_x)) and len(set(ids(ref_x))) == 3
    assert ids(ref_x) == ids(pick_reference(tmp_path / "train.npz", label=9, count=3, seed=1)[0])
    with pytest.raises(DataError, match="class 9 has 6 images, 7 requested"):
        pick_reference(tmp_path / "train.npz", label=9, count=7)


# --- normalisation -------------------------------------------------------------------------------------------
def test_normalisation_constants_match_the_spec_table():
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert NORMALIZATION == {
        "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        "stl10": ((0.44087798, 0.42790666, 0.38678814), (0.25507198, 0.24801506, 0.25641308)),
        "imagenet": imagenet, "CLIP": imagenet, "moco": imagenet}
    assert CLIP_NORMALIZATION == ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def test_to_model_input_scales_to_unit_range_then_normalises_per_channel():
    x = torch.tensor([[[[0, 255, 51]]]], dtype=torch.uint8)  # one 1x1 image, HWC
    mean, std = (0.5, 0.0, 0.2), (0.5, 1.0, 0.1)
    out = to_model_input(x, mean, std)
    assert out.shape == (1, 3, 1, 1) and out.dtype == torch.float32
    assert torch.allclose(out.flatten(), torch.tensor([-1.0, 1.0, 0.0]), atol=1e-6)
