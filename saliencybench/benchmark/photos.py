"""Real photographs that ship inside installed packages, with ImageNet-1k labels and hand-drawn boxes.

Eight photos from scikit-image (``skimage.data``), matplotlib (``grace_hopper.jpg``)
and scikit-learn (``load_sample_images``): no download, so an ImageNet model such
as ``efficientnet-lite0-imagenet`` can be benchmarked offline on real images. Each
photo carries the ImageNet-1k class that fits its main object and the bounding
box(es) of that object, annotated by eye on the native-resolution image as
(x1, y1, x2, y2) pixels, x2/y2 exclusive; the mask is the union of the boxes.
Photos without a fitting ImageNet class (astronaut, the binary ``horse``
silhouette, the motion-blurred ``clock``, ``coins``, ``moon``) are left out.
A photo whose source package is missing raises :class:`UnreadableImageError`
on load, which the runner skips and records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UnknownNameError
from .datasets import GroundTruthDataset, Sample, UnreadableImageError, boxes_mask, register_dataset
from .lite0 import imagenet_class_names


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        out = getattr(skimage.data, name)()
        return out[0] if name == "stereo_motorcycle" else out

    return load


def _matplotlib_grace_hopper() -> np.ndarray:
    from matplotlib.cbook import get_sample_data
    from PIL import Image

    with get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


@dataclass(frozen=True)
class Photo:
    """One shipped photo: where it comes from, its label and its annotated boxes.

    ``size`` is the (H, W) the boxes were drawn on; ``boxes`` are (x1, y1, x2, y2)
    pixels, x2/y2 exclusive; ``alternatives`` are other ImageNet classes that also fit.
    """

    source: str
    package: str
    loader: Callable[[], np.ndarray]
    size: tuple[int, int]
    label: int
    boxes: tuple[tuple[int, int, int, int], ...]
    note: str = ""
    alternatives: tuple[int, ...] = ()


PHOTOS: dict[str, Photo] = {
    "chelsea": Photo("skimage.data.chelsea()", "scikit-image", _skimage("chelsea"), (300, 451), 281,
                     ((0, 0, 400, 300),), "close-up of a tabby cat's head; the cat fills the frame up to its right ear",
                     (282, 285)),
    "coffee": Photo("skimage.data.coffee()", "scikit-image", _skimage("coffee"), (400, 600), 967,
                    ((173, 18, 408, 306),), "the cup of espresso with its handle, without saucer and spoon"),
    "rocket": Photo("skimage.data.rocket()", "scikit-image", _skimage("rocket"), (427, 640), 657,
                    ((310, 127, 334, 406),), "a Falcon 9 on its pad; the rocket body only, not the towers",
                    (744,)),
    "camera": Photo("skimage.data.camera()", "scikit-image", _skimage("camera"), (512, 512), 872,
                    ((230, 185, 411, 512),), "grayscale; the tripod from its head to where its legs leave the frame"),
    "motorcycle": Photo("skimage.data.stereo_motorcycle()[0]", "scikit-image", _skimage("stereo_motorcycle"),
                        (500, 741), 665, ((94, 16, 684, 453),),
                        "a motorcycle; ImageNet-1k has no motorcycle class and moped is the nearest; box includes "
                        "the far mirror", (670,)),
    "grace_hopper": Photo("matplotlib.cbook.get_sample_data('grace_hopper.jpg')", "matplotlib",
                          _matplotlib_grace_hopper, (600, 512), 652,
                          ((153, 23, 372, 174), (14, 317, 512, 600)),
                          "navy uniform: the cap and the jacket with shirt collar, not the face"),
    "china": Photo("sklearn.datasets.load_sample_image('china.jpg')", "scikit-learn", _sklearn("china.jpg"),
                   (427, 640), 698, ((63, 29, 372, 413),),
                   "the Tower of Buddhist Incense (Summer Palace), visible part above the trees"),
    "flower": Photo("sklearn.datasets.load_sample_image('flower.jpg')", "scikit-learn", _sklearn("flower.jpg"),
                    (427, 640), 985, ((168, 85, 446, 360), (289, 375, 466, 427)),
                    "pompon dahlias (the main bloom and one cut by the bottom edge); ImageNet-1k has no dahlia "
                    "class and daisy, of the same family, is the nearest"),
}


def to_rgb_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 array [H,W] (grayscale) or [H,W,3|4] -> float Tensor[3,H,W] RGB in [0,1]."""
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    array = np.array(array[:, :, :3], dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1).float().div(255.0)


class PackagePhotos(GroundTruthDataset):
    """The shipped photos as samples; ``classes`` are the 1000 ImageNet-1k names."""

    def __init__(self, names: list[str]):
        super().__init__(list(names), imagenet_class_names())

    def load(self, key: str) -> Sample:
        photo = PHOTOS[key]
        try:
            array = photo.loader()
        except ImportError:
            raise UnreadableImageError(f"photo {key!r} ships with {photo.package}, which is not installed: "
                                       f"pip install {photo.package}") from None
        except Exception as e:
            msg = f"cannot read photo {key!r} from {photo.source} ({type(e).__name__}: {e})"
            raise UnreadableImageError(msg) from None
        height, width = array.shape[:2]
        if (height, width) != photo.size:
            raise UnreadableImageError(f"photo {key!r} from {photo.source} is {height}x{width} px, but its boxes were "
                                       f"annotated at {photo.size[0]}x{photo.size[1]}; this {photo.package} version "
                                       "ships a different image")
        boxes = torch.tensor(photo.boxes, dtype=torch.float32)
        return Sample(key, to_rgb_tensor(array), photo.label, boxes, boxes_mask(boxes, height, width),
                      meta={"source": photo.source, "class_name": self.classes[photo.label], "note": photo.note,
                            "alternatives": list(photo.alternatives)})


@register_dataset("photos")
def photos(*, names: list[str] | str | None = None) -> PackagePhotos:
    """Real photos shipped with scikit-image, matplotlib and scikit-learn; ImageNet-1k labels, hand-drawn boxes.

    ``names`` picks photos (default: all of chelsea, coffee, rocket, camera,
    motorcycle, grace_hopper, china, flower; a comma-separated string works too).
    Images are float Tensor[3,H,W] in [0,1] at native resolution; boxes Tensor[n,4]
    (x1, y1, x2, y2), mask bool Tensor[H,W] their union.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    chosen = list(PHOTOS) if names is None else list(names)
    for name in chosen:
        if name not in PHOTOS:
            raise UnknownNameError("photo", name, PHOTOS)
    return PackagePhotos(chosen)
