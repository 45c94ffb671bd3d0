"""Image files read as 8-bit RGB, whatever their mode (16-bit, float, palettes, alpha) and orientation,
and padded to a square on request."""
import os


def load_image(path, pad_to_square=False, background=(0, 0, 0)):
    """Any image file as 8-bit RGB, upright as its EXIF orientation says (a phone's portrait photo):
    RGBA and palettes over white, grayscale, CMYK, 16-bit, 32-bit float (0 to 1 is black to white).
    pad_to_square: LLaVA-1.5's padding of the short side with `background` (the image mean).
    A FIFO or a device (/dev/zero) is refused: reading it would never end."""
    from PIL import Image, ImageOps
    import numpy as np
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is not a regular file (a FIFO, a device?)")
    with Image.open(path) as image:
        image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or 32-bit grayscale
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if image.mode == "F" and pixels.max() <= 1.0:  # float pixels from 0 (black) to 1 (white)
            top = 1.0
        else:
            top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray((pixels.clip(0, top) / top * 255).round().astype(np.uint8), "L")
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    image = image.convert("RGB")
    if pad_to_square and image.width != image.height:
        side = max(image.size)
        square = Image.new("RGB", (side, side), background)
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = square
    return image
