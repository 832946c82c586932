"""Orientation-free outputs (test-time augmentation): plankton have no "up", so the same organism
appears at any angle and mirrored. With TTA set, evaluation, embedding, open-set scores, calibration
and prediction run each image in several orientations and average the head's logits and embeddings.

An orientation is a number 0..7: quarter turns `o % 4` (counter-clockwise) of the image, mirrored
left-right first when `o >= 4`. The eight together are the symmetries of the square (the dihedral
group D4). Each orientation other than 0 has its own trunk-cache folder, so a second run reads them
all from disk."""
import numpy as np
import torch

# TTA setting -> the orientations averaged: one table, a new set is one entry
TTA = {
    "none": (0,),
    "flips": (0, 4, 6, 2),  # as is, mirrored left-right, mirrored top-bottom, both (= half a turn): a group,
    # so a mirrored image gets the same outputs
    "dihedral": tuple(range(8)),  # every quarter turn, mirrored and not
}


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """An image tensor (... x H x W) in one of the eight orientations."""
    if orientation >= 4:
        x = x.flip(-1)
    return torch.rot90(x, orientation % 4, dims=(-2, -1)) if orientation % 4 else x


def averaged(outputs_of, orientations: tuple[int, ...]):
    """The mean, over `orientations`, of `outputs_of(orientation)`: an array, or a tuple of arrays
    (None items stay None, as a distributed rank other than 0 gets)."""
    total = None
    for orientation in orientations:
        result = outputs_of(orientation)
        single = not isinstance(result, tuple)
        parts = (result,) if single else result
        if total is None:
            total = [None if p is None else np.asarray(p, dtype=np.float64) for p in parts]
        else:
            total = [t if p is None else t + p for t, p in zip(total, parts)]
    means = tuple(None if t is None else (t / len(orientations)).astype(np.float32) for t in total)
    return means[0] if single else means
