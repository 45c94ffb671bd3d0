"""Image files read as the authors read them (`Image.open(path).convert("RGB")`, llava/eval/*.py and
train.py), upright, and padded to a square on request as their expand2square does (mm_utils.py)."""
import os


def load_image(path, pad_to_square=False, background=(0, 0, 0)):
    """Any image file as 8-bit RGB, as the authors' `.convert("RGB")` makes it: a transparent pixel
    keeps the colour stored under it (Pillow drops the alpha; transformers 4.37's convert_to_rgb, which
    their image processor runs, does the same; transformers 5's composites over white instead, which
    is why the image is made RGB here first); a palette gives its colours; 16-bit and 32-bit grey are
    clipped at 255, as Pillow converts them (a 16-bit PNG's mid-grey is white). One difference: the
    image is turned upright as its EXIF orientation says (a phone's portrait photo); theirs is not.
    pad_to_square: LLaVA-1.5's padding of the short side with `background` (the image mean).
    A FIFO or a device (/dev/zero) is refused: reading it would never end."""
    from PIL import Image, ImageOps
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is not a regular file (a FIFO, a device?)")
    with Image.open(path) as image:
        image.load()
    image = ImageOps.exif_transpose(image).convert("RGB")
    return expand2square(image, background) if pad_to_square else image


def expand2square(image, background):
    """The authors' expand2square (mm_utils.py): the image in the middle of a square of its long side,
    the rest `background` (they give the image processor's mean, each channel int(255 * mean))."""
    from PIL import Image
    if image.width == image.height:
        return image
    side = max(image.size)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def mean_colour(image_processor):
    """The padding colour the authors give expand2square: tuple(int(x * 255) for x in image_mean)."""
    return tuple(int(255 * m) for m in image_processor.image_mean)


def open_image(path):
    """(PIL image, None) or (None, a one-line reason): for chat.py."""
    try:
        return load_image(path), None
    except Exception as e:  # missing, unreadable, not an image, a decompression bomb
        return None, f"cannot use image {path}: {type(e).__name__}: {e}"
