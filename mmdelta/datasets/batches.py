"""Detection batches generated in memory (no files): squares, discs and bars on noise, in the
raw batch format of mmdet's ``PackDetInputs`` — for a training step without a dataset
(``tools/quickcheck.py``). :mod:`mmdelta.datasets.synthetic` writes datasets to disk in the
real formats instead."""

from __future__ import annotations

import torch


def shapes_batch(seed: int, num_classes: int, size: int = 128, batch: int = 2) -> dict:
    """Images with 1-4 filled squares / discs / bars on noise, and their boxes and labels.

    Returns the raw batch format of mmdet's ``PackDetInputs``: ``inputs`` (uint8 CHW) and
    ``data_samples`` (``DetDataSample`` with ``gt_instances``).
    """
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inputs, samples = [], []
    for _ in range(batch):
        img = torch.randint(0, 96, (3, size, size), generator=gen).float()
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 5, (1,), generator=gen))):
            label = int(torch.randint(0, num_classes, (1,), generator=gen))
            w, h = (int(v) for v in torch.randint(16, 48, (2,), generator=gen))
            if label == 2:  # bars are long and thin
                h = max(6, h // 4)
            x0, y0 = (int(torch.randint(0, size - s, (1,), generator=gen)) for s in (w, h))
            inside = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            if label == 1:  # discs: the ellipse inscribed in the box
                cx, cy = x0 + w / 2, y0 + h / 2
                inside &= ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1
            colour = torch.rand(3, 1, generator=gen) * 155 + 100
            img[:, inside] = colour.expand(3, int(inside.sum()))
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label)
        sample = DetDataSample(
            metainfo=dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0))
        )
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor(labels)
        )
        inputs.append(img.to(torch.uint8))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)
