"""Near-duplicate images: resized, re-encoded, lightly cropped or mirrored copies of one picture.

Two steps, the usual retrieval-then-verification of image search:

1. **Candidates** by cosine distance of backbone features of the whole image at low resolution (computed by
   :func:`toolkit.train.probe.duplicate_embedding`: every image is first shrunk, so a downscaled copy and its
   original look alike; mirror-averaged, so a mirrored copy does too). A pair is a candidate when one is among
   the other's nearest neighbours, closer than :data:`CANDIDATE_DISTANCE` x the median distance from an image
   to its nearest neighbour (cleanlab's relative rule for near-duplicates, looser: see below).
2. **Verification**: ORB keypoints matched between the two images (and the mirror image) must agree on one
   similarity transform (scale, rotation, shift: what resizing and cropping do), found by RANSAC with
   OpenCV, with at least :data:`MIN_INLIERS` matches. Two photos of different objects, however alike, do not.

Why not features alone (cleanlab's own check): on planted copies in clothing-small and hymenoptera,
cleanlab's default threshold (0.13 x the median nearest-neighbour distance) on the classifier's features
found 5 % and 0 % of them, and no looser threshold found them all without false pairs (``benchmarks/audit.py``).
"""

from __future__ import annotations

import numpy as np

CANDIDATE_DISTANCE = 0.6  # x the median nearest-neighbour cosine distance
NEIGHBOURS = 5
MIN_INLIERS = 20
KEYPOINT_SIDE = 256  # images are matched at this longer side
RATIO = 0.8  # Lowe's ratio test for descriptor matches


def candidate_pairs(embedding: np.ndarray) -> list[tuple[int, int, float]]:
    """(i, j, distance / median nearest-neighbour distance), i < j, of the close pairs (step 1)."""
    from sklearn.neighbors import NearestNeighbors

    n = len(embedding)
    if n < 2:
        return []
    k = min(NEIGHBOURS, n - 1)
    distances, neighbours = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(embedding).kneighbors(embedding)
    median = max(float(np.median(distances[:, 1])), 1e-12)
    pairs: dict[tuple[int, int], float] = {}
    for i in range(n):
        for d, j in zip(distances[i, 1:], neighbours[i, 1:]):
            if j != i and d < CANDIDATE_DISTANCE * median:
                pairs[(min(i, int(j)), max(i, int(j)))] = float(d) / median
    return [(i, j, rel) for (i, j), rel in sorted(pairs.items())]


def keypoints(path: str):
    """ORB keypoint positions and descriptors of the image at ``path`` and of its mirror image."""
    import cv2
    from PIL import Image

    with Image.open(path) as image:
        image.draft("L", (KEYPOINT_SIDE, KEYPOINT_SIDE))
        gray = image.convert("L")
        gray.thumbnail((KEYPOINT_SIDE, KEYPOINT_SIDE))
        pixels = np.asarray(gray)
    orb = cv2.ORB_create(500)
    out = []
    for view in (pixels, np.ascontiguousarray(pixels[:, ::-1])):
        points, descriptors = orb.detectAndCompute(view, None)
        out.append((np.float32([p.pt for p in points]).reshape(-1, 2), descriptors))
    return out


def inliers(a, b) -> int:
    """Matches between keypoints ``a`` and ``b`` that one similarity transform explains (RANSAC)."""
    import cv2

    (points_a, desc_a), (points_b, desc_b) = a, b
    if desc_a is None or desc_b is None or len(desc_a) < 2 or len(desc_b) < 2:
        return 0
    matches = [m[0] for m in cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(desc_a, desc_b, k=2)
               if len(m) == 2 and m[0].distance < RATIO * m[1].distance]
    if len(matches) < 3:
        return 0
    src = points_a[[m.queryIdx for m in matches]]
    dst = points_b[[m.trainIdx for m in matches]]
    _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=4.0)
    return int(mask.sum()) if mask is not None else 0


def near_duplicate_pairs(embedding: np.ndarray, paths) -> list[tuple[int, int, float, int]]:
    """(i, j, relative distance, inliers) of every verified near-duplicate pair, i < j."""
    found, cache = [], {}

    def points(i: int):
        if i not in cache:
            try:
                cache[i] = keypoints(paths[i])
            except OSError:
                cache[i] = [(np.zeros((0, 2), np.float32), None)] * 2
        return cache[i]

    for i, j, rel in candidate_pairs(embedding):
        plain = points(i)[0]
        count = max(inliers(plain, points(j)[0]), inliers(plain, points(j)[1]))
        if count >= MIN_INLIERS:
            found.append((i, j, rel, count))
    return found
