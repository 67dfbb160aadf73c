"""Data poisoning of pre-training, as CTRL attacks (Li et al., ICCV 2023, arXiv 2210.07346, Sec. 3).

The attacker never touches the encoder: it adds its trigger to a few images of the target class in the data
that someone else pre-trains on. Self-supervised training then ties the trigger to that class's features,
and at test time any stamped image embeds near the target class. CTRL poisons 1 % of the training set, all
of it taken from the target class (the first images of that class, in dataset order).
"""
import numpy as np

CTRL_RATE = 0.01  # CTRL's poisoning rate: a fraction of the whole training set


def poisoned_indices(labels: np.ndarray, target_label: int, rate: float = CTRL_RATE) -> np.ndarray:
    """The images CTRL poisons: the first int(rate * N) images of the target class (all of them if fewer)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not len(labels):
        raise ValueError("poisoning needs one class label per pre-training image")
    of_target = np.flatnonzero(labels == target_label)
    if not len(of_target):
        raise ValueError(f"the pre-training data has no image of the target class {target_label}")
    return of_target[:int(rate * len(labels))]


def poison_target_class(images: np.ndarray, labels: np.ndarray, trigger, target_label: int,
                        rate: float = CTRL_RATE) -> tuple[np.ndarray, np.ndarray]:
    """A copy of uint8 (N,H,W,3) images with `trigger` stamped on the poisoned ones; returns (images, indices)."""
    index = poisoned_indices(labels, target_label, rate)
    poisoned = images.copy()
    if len(index):
        poisoned[index] = trigger(images[index])
    return poisoned, index
