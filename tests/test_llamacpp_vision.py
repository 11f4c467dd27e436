"""Images on `--backend llama.cpp`: the mmproj run by llama.cpp's own multimodal library (libmtmd), our
prompts and sampling. Oracles: llama.cpp's own multimodal pipeline (mtmd_tokenize + its helpers decoding
the chunks) on the same files and image, and the torch backend on the same GGUF + mmproj (itself checked
against transformers' Mistral3ForConditionalGeneration in test_vision.py)."""

from __future__ import annotations

import ctypes
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import devstral
from devstral.engine.llamacpp_model import llama_cpp_unavailable
from devstral.errors import DevstralError

sys.path.insert(0, str(Path(__file__).parent))
from test_vision import QUESTION, ask, data_url, mistral_common_encoding, png  # noqa: E402
from test_vision_gguf import _gguf, _png_url  # noqa: E402

pytestmark = pytest.mark.skipif(llama_cpp_unavailable() is not None, reason=str(llama_cpp_unavailable()))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _gguf(tmp_path_factory.mktemp("llamacpp_vision"))


def _load(path, mmproj=None, **kw):
    return devstral.load(path, mmproj=mmproj, backend="llama.cpp", device="cpu", kv_cache_dtype="fp32",
                         max_context=256, threads=2, **kw)


@pytest.fixture(scope="module")
def llama(files):
    return _load(files[1], files[2])  # F32 text GGUF, F32 mmproj


@pytest.fixture(scope="module")
def torch_llm(files):
    return devstral.load(files[1], mmproj=files[2], device="cpu", dtype="fp32", backend="torch", max_context=256)


def _image_messages(height: int, width: int, seed: int) -> tuple[list[dict], np.ndarray]:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    url = _png_url(Image.fromarray(pixels))
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}], pixels


def test_recovered_pixels_are_mistral_commons_resize():
    """The uint8 image handed to libmtmd is mistral-common's (resized) image: for one of whole tokens,
    which it does not resize, the inversion of its normalization gives the original bytes back."""
    from mistral_common.tokens.tokenizers.image import DATASET_MEAN, DATASET_STD, normalize

    from devstral.engine.llamacpp_images import image_bytes

    rgb = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    rgb[0, 0], rgb[0, 1] = 0, 255
    np.testing.assert_array_equal(image_bytes(normalize(rgb.astype(np.float32), DATASET_MEAN, DATASET_STD)), rgb)


def test_logits_equal_llama_cpps_own_multimodal_pipeline(files, llama):
    """An image of whole tokens: our engine on llama.cpp (mistral-common's ids, libmtmd's embeddings fed
    as a batch of embeddings) against llama.cpp's own pipeline (its tokenizer with the media marker,
    mtmd_helper_eval_chunks) on the same files: the same next-token logits."""
    import llama_cpp as lc
    from llama_cpp import mtmd_cpp as lib

    messages, pixels = _image_messages(24, 40, 11)
    ids = llama.tokenizer.encode_chat(messages, system_prompt=None)
    ours = llama.logits(ids)
    marker = lib.mtmd_default_marker().decode()
    text = llama.tokenizer.render_chat([{"role": "user", "content": marker + QUESTION}]).encode()
    params = lib.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 2, False, False
    ctx = lib.mtmd_init_from_file(str(files[2]).encode(), llama.model.ptr, params)
    cparams = lc.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_threads, cparams.n_threads_batch = 256, 256, 2, 2
    cparams.type_k = cparams.type_v = 0  # F32, as ours
    cparams.flash_attn_type = 0
    lctx = lc.llama_init_from_model(llama.model.ptr, cparams)
    data = (ctypes.c_uint8 * pixels.size).from_buffer_copy(pixels.tobytes())
    bitmaps = (lib.mtmd_bitmap_p_ctypes * 1)(lib.mtmd_bitmap_init(pixels.shape[1], pixels.shape[0], data))
    chunks = lib.mtmd_input_chunks_init()
    try:
        assert lib.mtmd_tokenize(ctx, chunks, ctypes.byref(lib.mtmd_input_text(text, len(text), False, True)),
                                 bitmaps, 1) == 0
        n_past = lc.llama_pos(0)
        assert lib.mtmd_helper_eval_chunks(ctx, lctx, chunks, 0, 0, 256, True, ctypes.byref(n_past)) == 0
        assert n_past.value == len(ids)
        theirs = torch.from_numpy(np.ctypeslib.as_array(lc.llama_get_logits_ith(lctx, -1),
                                                        shape=(llama.config.vocab_size,)).copy())
    finally:
        lib.mtmd_input_chunks_free(chunks)
        lib.mtmd_bitmap_free(bitmaps[0])
        lc.llama_free(lctx)
        lib.mtmd_free(ctx)
    if not torch.isfinite(theirs).all():
        pytest.skip("llama.cpp's own pipeline hit its NaN [IMG_BREAK] rows (see llamacpp_images.py)")
    assert (ours[-1] - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item() + 1e-5


@pytest.mark.parametrize("height, width", [(24, 40), (53, 37)])
def test_logits_equal_the_torch_backend(llama, torch_llm, height, width):
    """Every position's logits against the torch engine on the same GGUF + mmproj, fed the 8-bit image
    libmtmd gets. 24x40 is whole tokens: mistral-common does not resize it, so those are its pixels.
    53x37 is resized by mistral-common in float32 (bicubic, overshooting 0..255 on noise) and libmtmd
    takes 8 bits: against the unrounded pixels only a correlation holds (measured 0.99958).
    Measured: 2.0e-3 of logits up to 3.1 inside the image rows (llama.cpp's GELU is a float16 table),
    2.5e-4 after them, 1e-6 before."""
    from dataclasses import replace

    from mistral_common.tokens.tokenizers.image import DATASET_MEAN, DATASET_STD, normalize

    from devstral.engine.llamacpp_images import image_bytes
    from devstral.prompt.images import PromptIds

    messages, _ = _image_messages(height, width, 3)
    ids = llama.tokenizer.encode_chat(messages, system_prompt=None)
    assert list(ids) == list(torch_llm.tokenizer.encode_chat(messages, system_prompt=None))
    image = ids.images[0]
    eight_bit = normalize(image_bytes(image.pixels).astype(np.float32), DATASET_MEAN, DATASET_STD)
    if (height, width) == (24, 40):
        np.testing.assert_allclose(eight_bit, image.pixels, atol=1e-6)
    same_pixels = PromptIds(list(ids), [replace(image, pixels=np.ascontiguousarray(eight_bit), digest=b"8" * 16)])
    ours, ref = llama.logits(ids), torch_llm.logits(same_pixels)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1.5e-3 * ref.abs().max().item()
    assert (ours[image.end:] - ref[image.end:]).abs().max().item() <= 1e-3
    assert ours[-1].argmax() == ref[-1].argmax()
    plain = torch_llm.logits(ids)
    assert torch.corrcoef(torch.stack([ours.flatten(), plain.flatten()]))[0, 1] >= 0.999


def test_chat_streams_what_the_torch_backend_says_and_encodes_once(files, torch_llm):
    """Greedy answers equal the torch backend's, with a step budget that cuts the image across steps and
    two requests decoded together; the second turn with the same screenshot reuses its cells (cached
    tokens cover the image) and does not run the encoder again; another image of the same size is not
    served from the first one's cells."""
    from devstral.engine.sampling import SamplingParams

    llm = _load(files[1], files[2], parallel=2, max_batched_tokens=16)
    greedy = SamplingParams(temperature=0, max_tokens=5)
    a, b = png(37, 29, 6), png(37, 29, 7)  # the same size: identical [IMG] ids
    first = llm.chat(ask(a), sampling=greedy)
    assert first.message["content"] == torch_llm.chat(ask(a), sampling=greedy).message["content"]
    images = llm.engine.images
    assert images.encoded_images == 1
    history = [*ask(a), first.message, {"role": "user", "content": "And now?"}]
    second = llm.chat(history, sampling=greedy)
    assert images.encoded_images == 1
    image = llm.tokenizer.encode_chat(ask(a)).images[0]
    assert second.usage["prompt_tokens_details"]["cached_tokens"] >= image.end
    assert second.message["content"] == torch_llm.chat(history, sampling=greedy).message["content"]
    other = llm.chat(ask(b), sampling=greedy)
    assert images.encoded_images == 2
    assert other.usage["prompt_tokens_details"]["cached_tokens"] <= image.start + 1
    assert other.message["content"] == torch_llm.chat(ask(b), sampling=greedy).message["content"]
    # two image requests in flight at once, each answered as alone
    streams = [llm.stream_chat(ask(x), sampling=greedy) for x in (png(30, 30, 8), png(50, 20, 9))]
    for s in streams:
        list(s)
    for s, x in zip(streams, (png(30, 30, 8), png(50, 20, 9)), strict=True):
        assert s.result.message["content"] == torch_llm.chat(ask(x), sampling=greedy).message["content"]


def test_projector_found_beside_the_model_and_auto_keeps_llama_cpp(files, capfd):
    """`devstral quantize` wrote mmproj-m3.gguf beside the GGUF: --backend llama.cpp finds it, and
    --backend auto on a CPU stays on llama.cpp for images."""
    llm = _load(files[1])
    assert "note: vision projector" in capfd.readouterr().err
    assert llm.backend == "llama.cpp" and llm.vision is not None
    auto = devstral.load(files[1], device="cpu", max_context=128, threads=2)  # --device cpu: no CUDA in the choice
    assert auto.backend == "llama.cpp" and auto.vision is not None
    ids = llm.tokenizer.encode_chat(ask(png(24, 16, 5)), system_prompt=None)
    assert list(ids) == mistral_common_encoding(files[0], ask(png(24, 16, 5))).tokens


def test_without_a_projector_images_are_a_one_line_error(files, tmp_path):
    alone = tmp_path / "m3.gguf"
    shutil.copy(files[1], alone)
    llm = _load(alone)
    assert llm.vision is None
    with pytest.raises(DevstralError, match="no vision projector: pass --mmproj"):
        llm.chat(ask(png(20, 20, 1)))
    with pytest.raises(DevstralError, match="--mmproj: .*no such file"):
        _load(alone, tmp_path / "missing.gguf")
    from devstral.engine.sampling import SamplingParams

    assert llm.chat([{"role": "user", "content": "hi"}], sampling=SamplingParams(max_tokens=2)).finish_reason


def test_run_image_on_the_llama_cpp_backend(files, tmp_path, capsys):
    import json

    from devstral.cli import main

    ckpt, model, exact = files
    image = tmp_path / "shot.png"
    image.write_bytes(png(45, 29, 8))
    assert main(["run", "--json", "-n", "2", "--temperature", "0", "--backend", "llama.cpp", "--model", str(model),
                 "--mmproj", str(exact), "--image", str(image), QUESTION]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_token_ids"] == mistral_common_encoding(ckpt, ask(image.read_bytes())).tokens


def test_server_on_llama_cpp_answers_the_openai_client_with_an_image(files, llama, torch_llm):
    import openai

    from devstral.engine.sampling import SamplingParams
    from test_server_harness import _start

    data = png(37, 29, 6)
    ref = torch_llm.chat(ask(data), sampling=SamplingParams(temperature=0, max_tokens=6))
    server = _start(llm=llama, model_id="m3")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="m3", messages=ask(data), max_tokens=6, temperature=0)
        assert r.choices[0].message.content == ref.message["content"]
        with pytest.raises(openai.BadRequestError, match="not an image"):
            client.chat.completions.create(model="m3", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(b"GIF89a nonsense")}}]}])
        ok = client.chat.completions.create(model="m3", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert ok.choices[0].message is not None
    finally:
        server.server.should_exit = True
