"""Real photographs that ship inside scikit-image, cut into small patches: demo data with no download."""
from pathlib import Path

import numpy as np

# the colour photographs bundled in scikit-image's data folder (no network needed)
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
          "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")


def load_photos() -> list[np.ndarray]:
    """The bundled photos as uint8 (H,W,3) arrays."""
    import skimage.data
    from PIL import Image
    folder = Path(skimage.data.__file__).parent
    return [np.asarray(Image.open(folder / name).convert("RGB")) for name in PHOTOS]


def photo_patches(n: int, size: int = 32, seed: int = 0, photos=None, return_labels: bool = False):
    """n random square crops (side 40 px to half the photo's short side), resized to size: uint8 (n,size,size,3);
    with return_labels also the index of each crop's photo, int64 (n,) (the same crops either way)."""
    from PIL import Image
    photos = photos if photos is not None else load_photos()
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):  # data preparation, once per demo: not on any training hot path
        labels[i] = rng.integers(len(photos))
        photo = photos[labels[i]]
        h, w = photo.shape[:2]
        side = int(rng.integers(40, min(h, w) // 2))
        top, left = rng.integers(0, h - side), rng.integers(0, w - side)
        crop = Image.fromarray(photo[top:top + side, left:left + side])
        out[i] = np.asarray(crop.resize((size, size), Image.BILINEAR))
    return (out, labels) if return_labels else out
