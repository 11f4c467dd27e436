"""Images on the llama.cpp backend: the mmproj GGUF run by llama.cpp's multimodal library (libmtmd).

Prompts stay ours: mistral-common lays out the [IMG] / [IMG_BREAK] / [IMG_END] ids and resizes each
image (prompt/images.py). llama.cpp only computes: libmtmd encodes the image into the decoder's input
embeddings, and the engine decodes those rows as a llama_batch of embeddings (llamacpp_engine.py).

libmtmd is handed mistral-common's resized image, recovered from the normalized array and rounded to
the 8-bit RGB libmtmd takes: exact for an image whose sides are whole tokens (mistral-common does not
resize it), within half a level otherwise (its bicubic resize runs in float32). Such an image is not
resized again by llama.cpp's pixtral preprocessing, so both backends see the same pixels and the same
number of embeddings (checked).

llama.cpp's pixtral chunk is an image's [IMG] and [IMG_BREAK] rows ([IMG_END] stays a text token), which
is exactly our run minus its last token. Its graph makes the break rows by adding the mmproj's
`v.token_embd.img_break` to a never-written tensor scaled by 0, which is NaN where that memory held NaN
or inf bits (seen in llama.cpp 0.3.36): the break rows are set to that embedding here, which is what the
graph means to produce.

Encoded images are kept by content digest in a small LRU, as the torch engine's ImageEmbedder does: a
second turn with the same screenshot, a retried request or n choices do not encode it again.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from devstral.engine.llamacpp_model import LlamaCppModel, llama_errors
from devstral.errors import DevstralError
from devstral.prompt.images import PromptImage, take_from_cache

# mistral-common's normalization (tokens/tokenizers/image.py), inverted to recover the resized pixels
_MEAN = np.asarray((0.48145466, 0.4578275, 0.40821073), dtype=np.float64)[:, None, None]
_STD = np.asarray((0.26862954, 0.26130258, 0.27577711), dtype=np.float64)[:, None, None]


def mtmd_unavailable() -> str | None:
    """None when this llama-cpp-python has the multimodal library, else why not."""
    try:
        from llama_cpp import mtmd_cpp  # noqa: F401
    except (ImportError, OSError) as e:
        return (f"this llama-cpp-python has no multimodal library (libmtmd: {e}); install llama-cpp-python "
                ">= 0.3.36, or use --backend torch")
    return None


def image_bytes(pixels: np.ndarray) -> np.ndarray:
    """mistral-common's normalized [C, H, W] float32 pixels -> the resized image as [H, W, 3] uint8."""
    rgb = (pixels.astype(np.float64) * _STD + _MEAN) * 255.0
    return np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8).transpose(1, 2, 0))


def _img_break(path: Path) -> np.ndarray | None:
    from devstral.formats.gguf_mmproj import IMG_BREAK
    from devstral.formats.gguf_read import GGUFFile

    g = GGUFFile(path)
    if IMG_BREAK not in g.infos:
        return None
    return g.tensor(IMG_BREAK).float().reshape(-1).numpy()


class LlamaCppImages:
    """libmtmd over one mmproj GGUF and the text model's weights: image -> input embeddings of its
    [IMG] / [IMG_BREAK] rows, as float32 [rows, n_embd]."""

    def __init__(self, model: LlamaCppModel, mmproj: Path, *, threads: int, capacity: int = 32):
        reason = mtmd_unavailable()
        if reason:
            raise DevstralError(reason)
        from llama_cpp import mtmd_cpp

        self.lib, self.model, self.path = mtmd_cpp, model, Path(mmproj)
        self.capacity = capacity
        self.cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.encoded_images = 0  # images that went through the encoder (tests, benchmarks)
        self.img_break = _img_break(self.path)
        from devstral.engine.llamacpp_model import _log_state

        if _log_state["callback"] is not None:  # libmtmd's log goes where llama.cpp's does (errors kept)
            mtmd_cpp.mtmd_log_set(_log_state["callback"], ctypes.c_void_p(0))
            mtmd_cpp.mtmd_helper_log_set(_log_state["callback"], ctypes.c_void_p(0))
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = model.gpu_layers != 0
        params.n_threads = threads
        params.print_timings = False
        params.warmup = False
        llama_errors(clear=True)
        self.ctx = mtmd_cpp.mtmd_init_from_file(str(self.path).encode(), model.ptr, params)
        if not self.ctx:
            cause = llama_errors(clear=True).split("; ")[0]
            raise DevstralError(f"{self.path}: llama.cpp's multimodal library could not load this projector: "
                                f"{cause or 'no reason given'} (--backend torch runs it with our encoder)")
        if not mtmd_cpp.mtmd_support_vision(self.ctx):
            self.close()
            raise DevstralError(f"{self.path}: llama.cpp reads no vision encoder in this projector")
        model.register(self)  # closed before the weights it was made with

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.mtmd_free(self.ctx)
        self.ctx = None

    def to(self, device: Any) -> LlamaCppImages:
        """keep_alive's unload (to "meta"): the projector goes with the weights."""
        if str(device) != "meta":
            raise DevstralError("a llama.cpp projector stays where llama.cpp put it")
        self.close()
        self.cache.clear()
        return self

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    def embeddings(self, images: list[PromptImage]) -> list[np.ndarray]:
        """Per image, float32 [image.length - 1, n_embd]: the inputs of its positions image.start ..
        image.end - 2 (its [IMG_END] is decoded as a token). Only images not cached are encoded."""
        for im in images:
            if im.digest not in self.cache:
                self.cache[im.digest] = self._encode(im)
                self.encoded_images += 1
        return take_from_cache(self.cache, images, self.capacity)

    def _encode(self, image: PromptImage) -> np.ndarray:
        if self.ctx is None:
            raise RuntimeError("the llama.cpp projector was closed")
        lib = self.lib
        rgb = image_bytes(image.pixels)
        data = (ctypes.c_uint8 * rgb.size).from_buffer(rgb)
        bitmap = lib.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data)
        if not bitmap:
            raise RuntimeError("libmtmd could not make a bitmap")
        chunks = lib.mtmd_input_chunks_init()
        try:
            marker = lib.mtmd_default_marker()
            text = lib.mtmd_input_text(marker, len(marker), False, True)
            bitmaps = (lib.mtmd_bitmap_p_ctypes * 1)(bitmap)
            llama_errors(clear=True)
            if lib.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise DevstralError(f"llama.cpp could not take this image: {llama_errors(clear=True) or 'no reason given'}")
            chunk = self._image_chunk(chunks)
            n = int(lib.mtmd_input_chunk_get_n_tokens(chunk))
            if n != image.length - 1:  # (libmtmd reports a pixtral image as one row of n tokens: no grid)
                raise RuntimeError(f"llama.cpp laid out a {rgb.shape[1]}x{rgb.shape[0]} image as {n} embeddings, "
                                   f"mistral-common as {image.length - 1}")
            if lib.mtmd_encode_chunk(self.ctx, chunk) != 0:
                raise RuntimeError(f"llama.cpp failed to encode an image: {llama_errors(clear=True)}")
            ptr = lib.mtmd_get_output_embd(self.ctx)
            n_embd = int(llama_n_embd(self.model))
            out = np.ctypeslib.as_array(ptr, shape=(n, n_embd)).copy()
        finally:
            lib.mtmd_input_chunks_free(chunks)
            lib.mtmd_bitmap_free(bitmap)
        breaks = np.ones(n, dtype=bool)
        breaks[image.image_token_offsets] = False
        if self.img_break is not None and breaks.any():
            out[breaks] = self.img_break
        if not np.isfinite(out).all():
            raise RuntimeError("llama.cpp's image encoder returned non-finite values")
        return out

    def _image_chunk(self, chunks: Any):
        lib = self.lib
        for i in range(lib.mtmd_input_chunks_size(chunks)):
            chunk = lib.mtmd_input_chunks_get(chunks, i)
            if lib.mtmd_input_chunk_get_type(chunk) == lib.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                return chunk
        raise RuntimeError("libmtmd made no image chunk for an image")



def llama_n_embd(model: LlamaCppModel) -> int:
    from devstral.engine.llamacpp_model import llama_cpp

    return int(llama_cpp().llama_model_n_embd(model.ptr))
