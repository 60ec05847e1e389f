"""Image input: files, bytes, data: URLs and caption folders in; uint8 arrays and model tensors out.

    x = load_image("cat.jpg", 64)                   # uint8 [64, 64, 3]; also bytes, a PIL image or a numpy array
    x = load_image(decode_data_url(url), 64)        # what the server does with an OpenAI-style image_url
    pairs = load_folder("my_data")                  # [(Path, caption), ...] from my_data/captions.jsonl
    t = to_tensor(np.stack([...]))                  # float32 [N, 3, H, W] in [-1, 1]

Every way an image can be wrong becomes one ValueError that names the image (its path, or "image bytes") and what
is wrong with it, because these are the inputs a user or an API client controls: an undecodable or truncated file,
a zero-sized image, a pixel format we do not read, an array of the wrong shape or dtype, a decompression bomb.

Decisions a caller should know:
  - Resizing squashes to size x size with Pillow's bicubic filter (which widens its support when shrinking, so a
    large photo is averaged, not aliased); nothing is cropped, so a caption about the image's edge stays true.
    Aspect ratio is not kept: our scenes are square, and a model trained on squashed images reads squashed images.
  - Modes 1, L, LA, P, PA, RGB, RGBA and CMYK are read. Transparency is composited over white (a transparent PNG
    logo otherwise becomes a black square). CMYK (print JPEGs) is converted with Pillow's naive formula, no ICC
    profile: colours are approximate but recognisable, better than refusing. 16-bit and float modes (I;16, I, F)
    are refused: squeezing them into 8 bits needs a choice of range only the user can make.
  - Decoded files and bytes are turned upright by their EXIF orientation (phone photos are stored sideways); an
    array or PIL image the caller built is taken as it is. An animation gives its first frame.
  - More than MAX_PIXELS (40 MP) is refused before any pixel is decoded: a 40 MP RGB image is 120 MB decoded, and a
    small PNG can claim far more (Pillow itself only warns from 89 MP and refuses from 179 MP).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK")
ALPHA_MODES = ("LA", "PA", "RGBA")


def load_image(source: str | Path | bytes | Image.Image | np.ndarray, size: int) -> np.ndarray:
    """The image as uint8 [size, size, 3] RGB. `source` is a file path, the bytes of an encoded image, a PIL image,
    or a uint8 numpy array [H, W, 3]."""
    if not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size!r}")
    size = int(size)
    if isinstance(source, np.ndarray):
        name = "the image array"
        if source.ndim != 3 or source.shape[-1] != 3 or source.dtype != np.uint8:
            raise ValueError(
                f"{name} has shape {list(source.shape)} and dtype {source.dtype}; expected [height, width, 3] uint8 "
                "RGB (convert with np.asarray(image.convert('RGB')), or drop an alpha channel with array[..., :3])"
            )
        check_size(source.shape[1], source.shape[0], name)
        return finish(Image.fromarray(np.ascontiguousarray(source)), name, size)
    if isinstance(source, Image.Image):
        try:
            source.load()  # a lazily opened file decodes here; a no-op for an image already in memory
        except Exception as e:
            raise ValueError(f"the image could not be decoded by Pillow ({e})") from e
        return finish(source, "the image", size)
    if isinstance(source, bytes | bytearray | memoryview):
        return finish(decode(bytes(source), "image bytes"), "image bytes", size)
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            raise ValueError(f"{path} does not exist")
        if path.is_dir():
            raise ValueError(f"{path} is a folder, not an image file")
        return finish(decode(path.read_bytes(), str(path)), str(path), size)
    raise ValueError(
        f"load_image takes a path, bytes, a PIL image or a numpy array, not {type(source).__name__}"
    )  # a ValueError, not a TypeError, so the CLI and server report it as the user's mistake it is


def decode(data: bytes, name: str) -> Image.Image:
    """Decode every pixel now, so that a truncated or corrupt file fails here with its name and not in a resize.
    Pillow's plugins raise a zoo of types on bad input (OSError, SyntaxError, struct.error, EOFError, ValueError,
    IndexError...), hence the broad except."""
    if not data:
        raise ValueError(f"{name}: the file is empty" if name != "image bytes" else "image bytes are empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name} is too large to decode safely ({e})") from e
    except UnidentifiedImageError as e:  # its own text names a BytesIO object, which helps nobody
        raise ValueError(f"{name} is not an image Pillow can decode (no format it knows matches the data)") from e
    except Exception as e:
        raise ValueError(f"{name} is not an image Pillow can decode ({e})") from e
    check_size(*image.size, name)  # from the header, before a single pixel is decoded
    try:
        image.load()
        return ImageOps.exif_transpose(image)  # inside the try: a corrupt EXIF block fails here too
    except Exception as e:
        raise ValueError(f"{name} is not an image Pillow can decode ({e})") from e


def check_size(width: int, height: int, name: str) -> None:
    if width == 0 or height == 0:
        raise ValueError(f"{name} has zero width or height ({width} x {height} pixels)")
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"{name} is {width} x {height} = {width * height / 1e6:.0f} MP, over the limit of "
            f"{MAX_PIXELS / 1e6:.0f} MP (a guard against decompression bombs); shrink it first"
        )


def finish(image: Image.Image, name: str, size: int) -> np.ndarray:
    """RGB (alpha over white), squashed to size x size with bicubic resampling, as a fresh uint8 array."""
    check_size(*image.size, name)
    if image.mode not in MODES:
        raise ValueError(
            f"{name} has pixel mode {image.mode!r}, which deepsail does not read (it reads {', '.join(MODES)}); "
            "16-bit and float images need a range chosen by you: save it as 8-bit RGB or greyscale"
        )
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # a palette with a transparent index
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    elif image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.array(image, dtype=np.uint8)


# data:[<media type>][;<parameter>]*[;base64],<data> (RFC 2397); we take only base64-encoded image/* payloads.
DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<payload>.*)", re.DOTALL)


def decode_data_url(url: str, max_bytes: int = 10 * 2**20) -> bytes:
    """The bytes of a `data:image/<type>;base64,<payload>` URL, at most max_bytes of them (10 MiB by default). Other
    URLs are refused: the server never fetches anything on a client's behalf (no SSRF, no reading local files)."""
    if not isinstance(url, str):
        raise ValueError(f"an image URL must be a string, not {type(url).__name__}")
    shown = url[:40] + ("..." if len(url) > 40 else "")  # never echo a 10 MB payload into an error message
    url = url.strip()
    if url[:5].lower() != "data:":
        scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
        got = f"a {scheme}: URL" if scheme else f"{shown!r}"
        raise ValueError(
            f"only data: URLs are accepted; the server fetches nothing (got {got}). Send the image inline as "
            "data:image/png;base64,<base64 of the file>"
        )
    m = DATA_URL.fullmatch("data:" + url[5:])
    if m is None:
        raise ValueError(f"the data: URL {shown!r} has no ',' before its payload; expected data:image/png;base64,...")
    media = m["type"].strip().lower()
    if not media.startswith("image/") or len(media) == len("image/"):
        raise ValueError(f"the data: URL has media type {media or '(none)'!r}; expected image/png, image/jpeg, ...")
    if "base64" not in [p.strip().lower() for p in m["params"].split(";")]:
        raise ValueError(f"the data: URL {shown!r} is not base64-encoded; expected data:{media};base64,<payload>")
    payload = "".join(m["payload"].split())  # clients may wrap long base64 lines
    if not payload:
        raise ValueError("the data: URL has an empty payload")
    # Refuse by the encoded length, before decoding: 4 base64 characters carry 3 bytes, less one per "=" of padding,
    # which is exact for any payload that decodes at all.
    n_bytes = len(payload) // 4 * 3 - payload[-2:].count("=")
    if n_bytes > max_bytes:
        raise ValueError(f"the image in the data: URL is {n_bytes:,} bytes, over the limit of {max_bytes:,}")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as e:
        raise ValueError(f"the data: URL's payload is not valid base64 ({e})") from e


def load_folder(path: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a dataset folder: `captions.jsonl` holds one {"image": "<path relative to
    the folder>", "caption": "<text>"} per line (other keys are ignored, blank lines skipped; an image may have
    several captions), the images sit beside it, typically under images/. Every record is checked and every image
    file must exist, so a typo fails now with its line number and not hours into training; images are decoded only
    when loaded."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; a dataset folder holds captions.jsonl and the images")
    index = folder / "captions.jsonl"
    if not index.is_file():
        raise ValueError(
            f"{index} does not exist: a dataset folder holds captions.jsonl, one line per caption like "
            '{"image": "images/0001.png", "caption": "a red circle"}, and the images'
        )
    try:
        text = index.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{index} is not UTF-8 text ({e})") from e
    pairs = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{index}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict):
            raise ValueError(f'{where}: expected an object like {{"image": ..., "caption": ...}}, got {line.strip()}')
        for key in ("image", "caption"):
            if key not in record:
                raise ValueError(f'{where}: the "{key}" key is missing (each line needs "image" and "caption")')
            value = record[key]
            if not isinstance(value, str):
                raise ValueError(f'{where}: "{key}" must be a string, got {type(value).__name__} {value!r}')
            if not value.strip():
                raise ValueError(f'{where}: "{key}" is empty')
        rel = Path(record["image"])
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(
                f'{where}: image path {record["image"]!r} must be relative to {folder} and stay inside it (no "..")'
            )
        image = folder / rel
        if not image.is_file():
            raise ValueError(f"{where}: image {image} does not exist")
        pairs.append((image, record["caption"]))
    if not pairs:
        raise ValueError(f"{index} holds no records")
    return pairs


def to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] (or one image [H, W, 3]) -> float32 [N, 3, H, W] in [-1, 1], contiguous."""
    x = images_uint8
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim not in (3, 4) or x.shape[-1] != 3:
        got = f"shape {list(x.shape)} {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"to_tensor expects uint8 images [N, H, W, 3] or [H, W, 3], got {got}")
    x_NHWC = torch.from_numpy(np.ascontiguousarray(x if x.ndim == 4 else x[None]))
    return (x_NHWC.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0).contiguous()
