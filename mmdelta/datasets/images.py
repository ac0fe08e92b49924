"""Image files named by a user (command line or API): files, folders of images, or both."""

import os
from collections.abc import Sequence
from pathlib import Path

#: file name suffixes read as images (case-insensitive; what OpenCV / mmcv decode)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class NoImagesError(ValueError):
    """A folder without image files, or no images at all."""


def list_images(images: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by ``images`` — one file or folder, or a list of them — in the
    order given; a folder contributes its image files sorted by name (not recursive).

    Raises:
        FileNotFoundError: a named file or folder does not exist.
        NoImagesError: a folder holds no image file, or nothing was named.
    """
    entries = [images] if isinstance(images, str | os.PathLike) else list(images)
    files: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise NoImagesError(
                    f"image folder {path} holds no image files ({'/'.join(IMAGE_SUFFIXES)}; "
                    "folders are not searched recursively: name the folder that holds them)"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no image file or folder at {path}")
    if not files:
        raise NoImagesError("no images given: name a folder of images or image files")
    return files
