"""Images with a GGUF model and its mmproj projector: prompt ids against mistral-common, logits against
transformers' Mistral3ForConditionalGeneration, and our mmproj read by llama.cpp itself (libmtmd, through
llama-cpp-python): its image embeddings and its next-token logits against ours."""

from __future__ import annotations

import ctypes
import functools
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import devstral
from devstral.errors import DevstralError

sys.path.insert(0, str(Path(__file__).parent))
from test_vision import QUESTION, _ckpt, ask, data_url, hf_logits, mistral_common_encoding, png  # noqa: E402


@functools.cache
def _gguf(root: Path) -> tuple[Path, Path, Path]:
    """(checkpoint, F32 text GGUF with the F16 mmproj `quantize` writes beside it, F32 mmproj elsewhere)."""
    from devstral.cli import main
    from devstral.formats.gguf_mmproj import export_mmproj

    ckpt = _ckpt(root)
    model = root / "gguf" / "m3.gguf"
    model.parent.mkdir()
    assert main(["quantize", str(ckpt), str(model), "--type", "F32", "--no-progress"]) == 0
    exact = export_mmproj(ckpt, root / "mmproj-f32.gguf", ftype="F32")
    return ckpt, model, exact


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _gguf(tmp_path_factory.mktemp("vision_gguf"))


@pytest.fixture(scope="module")
def gguf_llm(files):
    _, model, exact = files
    return devstral.load(model, mmproj=exact, device="cpu", dtype="fp32", backend="torch", max_context=512)


def mixed(*images: bytes) -> list[dict]:
    """A user turn with text before, between and after the images (no two text parts in a row: a
    template joins them, mistral-common encodes each on its own, images or not)."""
    parts: list[dict] = [{"type": "text", "text": "Look at these:"}]
    for k, image in enumerate(images):
        parts += [{"type": "image_url", "image_url": {"url": data_url(image)}},
                  {"type": "text", "text": f" #{k}" if k < len(images) - 1 else QUESTION}]
    return [{"role": "user", "content": parts}]


def test_gguf_prompt_ids_and_pixels_equal_mistral_common(files, capfd):
    """The projector beside the model is found; the GGUF's chat template places each image where its part is."""
    ckpt, model, _ = files
    llm = devstral.load(model, device="cpu", dtype="fp32", backend="torch", max_context=512)
    assert "note: vision projector" in capfd.readouterr().err and llm.vision is not None
    messages = mixed(png(37, 53, 1), png(64, 20, 2))
    ids = llm.tokenizer.encode_chat(messages, system_prompt=None)
    ref = mistral_common_encoding(ckpt, messages)
    assert list(ids) == ref.tokens and len(ids.images) == 2
    for image, pixels in zip(ids.images, ref.images, strict=True):
        np.testing.assert_array_equal(image.pixels, pixels)
    # a typed marker look-alike stays text
    typed = [{"role": "user", "content": "\ue002abc:0\ue003 hi"}]
    assert list(llm.tokenizer.encode_chat(typed, system_prompt=None)) == \
        mistral_common_encoding(ckpt, typed).tokens


def test_tokenizer_json_places_images_as_mistral_common(tmp_path):
    """The same template path for a tokenizer.json folder (HFTokenizer): ids and pixels of mistral-common's
    tekken with the same image section; before enable_images, an image part is refused, not dropped."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from devstral.formats.gguf_chat import builtin_template
    from devstral.prompt.tokenizer import load_tokenizer
    from devstral.testing import tiny_vision_config, write_tekken
    from test_prompt_jinja_tokenizers import write_tokenizer_json

    vc = tiny_vision_config(64)
    write_tekken(tmp_path / "tekken.json", version="v13", inner_vocab=1500, image={
        "image_patch_size": vc.patch_size, "max_image_size": vc.image_size, "spatial_merge_size": 2})
    hf = tmp_path / "hf"
    hf.mkdir()
    write_tokenizer_json(tmp_path / "tekken.json", hf, builtin_template("v13"))
    tok = load_tokenizer(hf)
    messages = mixed(png(37, 53, 1), png(20, 64, 2))
    with pytest.raises(DevstralError, match="message 0: content part 1: cannot take an image: .*text-only"):
        tok.encode_chat(messages, system_prompt=None)
    tok.enable_images(vc)
    ids = tok.encode_chat(messages, system_prompt=None)
    ref = MistralTokenizer.from_file(str(tmp_path / "tekken.json")).encode_chat_completion(
        ChatCompletionRequest.from_openai(messages))
    assert list(ids) == ref.tokens and len(ids.images) == 2
    for image, pixels in zip(ids.images, ref.images, strict=True):
        np.testing.assert_array_equal(image.pixels, pixels)
    assert tok.render_chat(messages) == mistral_common_text(tmp_path, ref.tokens)


def mistral_common_text(ckpt, tokens: list[int]) -> str:
    """mistral-common's own text for ids, control tokens kept: the prompt as the model sees it."""
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(ckpt / "tekken.json")).decode(tokens, special_token_policy=SpecialTokenPolicy.KEEP)


def test_render_chat_shows_each_image_as_its_tokens(files, gguf_llm):
    """render_chat writes an image part as mistral-common's [IMG]/[IMG_BREAK]/[IMG_END] run for it, where the
    part is: the text is mistral-common's decoding of its ids, and tokenizing it gives those ids."""
    ckpt = files[0]
    messages = mixed(png(37, 53, 5), png(64, 20, 6))
    ref = mistral_common_encoding(ckpt, messages)
    text = gguf_llm.tokenizer.render_chat(messages)
    assert text == mistral_common_text(ckpt, ref.tokens)
    assert gguf_llm.tokenizer.encode_special(text) == ref.tokens
    alone = devstral.load(files[1], device="cpu", backend="torch", vision=False, max_context=64)
    with pytest.raises(DevstralError, match="message 0: content part 1: cannot take an image"):
        alone.tokenizer.render_chat(messages)  # refused, not silently dropped


def test_template_command_shows_images_without_loading_weights(files, tmp_path, capsys, monkeypatch):
    """`devstral template` on a GGUF with its projector beside it (or --mmproj): the ids and text of
    mistral-common for the image request, from headers alone; without a projector, one line naming --mmproj."""
    import json

    from devstral.cli import main
    from devstral.formats import gguf_read

    ckpt, model, exact = files
    messages = mixed(png(30, 44, 7))
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"messages": messages}))
    ref = mistral_common_encoding(ckpt, messages)
    monkeypatch.setattr(gguf_read.GGUFFile, "tensor", lambda *a, **k: pytest.fail("weights read"))
    for extra in ([], ["--mmproj", str(exact)]):
        assert main(["template", "--model", str(model), "-r", str(request), "--json", "--no-system", *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["token_ids"] == ref.tokens and out["prompt"] == mistral_common_text(ckpt, ref.tokens)
    alone = tmp_path / "alone" / "m3.gguf"
    alone.parent.mkdir()
    shutil.copy(model, alone)
    assert main(["template", "--model", str(alone), "-r", str(request)]) == 2
    err = capsys.readouterr().err
    assert "no vision projector: pass --mmproj" in err and len(err.strip().splitlines()) == 1


def test_gguf_and_mmproj_logits_equal_transformers(files, gguf_llm):
    from transformers import Mistral3ForConditionalGeneration

    ckpt = files[0]
    hf = Mistral3ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    messages = mixed(png(37, 53, 3), png(30, 30, 4))
    ids = gguf_llm.tokenizer.encode_chat(messages, system_prompt=None)
    ref = hf_logits(hf, mistral_common_encoding(ckpt, messages))
    assert (gguf_llm.logits(ids) - ref).abs().max().item() <= 1e-4
    engine = gguf_llm.engine.teacher_forced_logits(ids, chunk=11)  # the paged cache, images cut across chunks
    assert (engine - ref).abs().max().item() <= 1e-4


def test_gguf_without_a_projector_refuses_images_in_one_line(files, tmp_path):
    from devstral.cli import main

    model = tmp_path / "m3.gguf"
    shutil.copy(files[1], model)  # alone in its folder
    llm = devstral.load(model, device="cpu", dtype="fp32", backend="torch", max_context=256)
    assert llm.vision is None
    with pytest.raises(DevstralError, match=r"message 0: content part 0: cannot take an image: this GGUF has no "
                                            r"vision projector: pass --mmproj"):
        llm.tokenizer.encode_chat(ask(png(16, 16)))
    (tmp_path / "x.png").write_bytes(png(16, 16))
    assert main(["run", "--model", str(model), "--image", str(tmp_path / "x.png"), "-n", "1", "hi"]) == 2


def test_the_projector_beside_the_model_is_the_one_that_fits(files, tmp_path):
    """Hugging Face GGUF repos ship mmproj-F16/BF16/F32 (llama.cpp's and LM Studio's users keep them beside
    the model): ours by name first, then F16, BF16, F32; a projector for another width, or a file that is
    not a GGUF, is passed over; --no-vision loads none."""
    from devstral.formats.gguf_mmproj import find_mmproj, write_mmproj
    from devstral.model.vision import VisionModel
    from devstral.testing import tiny_vision_config

    model = tmp_path / "m3.gguf"
    shutil.copy(files[1], model)
    assert find_mmproj(model, 64) is None
    other = write_mmproj(VisionModel(tiny_vision_config(128)), tmp_path / "mmproj-F16.gguf")  # another model's
    (tmp_path / "mmproj-bf16.gguf").write_bytes(b"not a gguf")
    assert find_mmproj(model, 64) is None and find_mmproj(model, 128) == other
    for name in ("mmproj-F32.gguf", "mmproj-model-BF16.gguf", "mmproj-m3.gguf"):
        shutil.copy(files[2], tmp_path / name)
        assert find_mmproj(model, 64) == tmp_path / name
    shutil.copy(files[2], other)
    assert find_mmproj(model, 64) == tmp_path / "mmproj-m3.gguf"
    (tmp_path / "mmproj-m3.gguf").unlink()
    assert find_mmproj(model, 64) == other  # F16 before BF16 before F32
    assert devstral.load(model, device="cpu", backend="torch", vision=False, max_context=64).vision is None


def test_run_gguf_with_mmproj_and_image(files, tmp_path, capsys):
    import json

    from devstral.cli import main

    ckpt, model, exact = files
    image = tmp_path / "shot.png"
    image.write_bytes(png(45, 29, 8))
    # `--backend auto` on a CPU picks llama.cpp for a GGUF, images included (its libmtmd runs the projector)
    assert main(["run", "--json", "-n", "2", "--temperature", "0", "--model", str(model), "--mmproj", str(exact),
                 "--image", str(image), QUESTION]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_token_ids"] == mistral_common_encoding(ckpt, ask(image.read_bytes())).tokens


def test_server_gguf_images_with_the_openai_and_ollama_clients(files, gguf_llm, tmp_path):
    """A GGUF + F32 mmproj served: the real clients' images give what the safetensors checkpoint (checked
    against transformers in test_vision.py) answers in-process. A GGUF without a projector answers 400
    with the reason, and keeps serving."""
    import base64

    import httpx
    import ollama
    import openai

    from devstral.engine.sampling import SamplingParams
    from test_server_harness import _start

    reference = devstral.load(files[0], device="cpu", dtype="fp32", backend="torch", max_context=512)
    data = png(37, 29, 6)
    ref = reference.chat(ask(data), sampling=SamplingParams(temperature=0, max_tokens=6))
    server = _start(llm=gguf_llm, model_id="m3")
    try:
        r = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="m3", messages=ask(data), max_tokens=6, temperature=0)
        assert r.choices[0].message.content == ref.message["content"]
        assert r.usage.prompt_tokens == ref.usage["prompt_tokens"]
        o = ollama.Client(host=server.url).chat(model="m3", stream=False, options={"temperature": 0, "num_predict": 6},
                                                messages=[{"role": "user", "content": QUESTION, "images": [data]}])
        assert o.message.content == ref.message["content"]
    finally:
        server.server.should_exit = True
    alone = tmp_path / "m3.gguf"
    shutil.copy(files[1], alone)
    text_server = _start(llm=devstral.load(alone, device="cpu", backend="torch", max_context=256), model_id="m3")
    try:
        r = httpx.post(text_server.url + "/v1/chat/completions", timeout=60, json={"model": "m3", "messages": ask(data)})
        assert r.status_code == 400 and "no vision projector: pass --mmproj" in r.json()["error"]["message"]
        r = httpx.post(text_server.url + "/api/chat", timeout=60, json={"model": "m3", "stream": False, "messages": [
            {"role": "user", "content": "x", "images": [base64.b64encode(data).decode()]}]})
        assert r.status_code == 400 and "no vision projector" in r.json()["error"]
        ok = httpx.post(text_server.url + "/v1/chat/completions", timeout=60,
                        json={"model": "m3", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200
    finally:
        text_server.server.should_exit = True


# ---------------------------------------------------------------------------------------------------
# llama.cpp's own multimodal path (libmtmd) reading the mmproj we wrote

@pytest.fixture(scope="module")
def mtmd(files):
    from devstral.engine.llamacpp_model import LlamaCppModel, llama_cpp_unavailable

    if llama_cpp_unavailable():
        pytest.skip(llama_cpp_unavailable())
    from llama_cpp import mtmd_cpp

    return mtmd_cpp, LlamaCppModel(files[1])


def _mtmd_context(mtmd, mmproj: Path):
    lib, model = mtmd
    params = lib.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 2, False, False
    params.flash_attn_type = 0  # off: exact attention, as ours
    ctx = lib.mtmd_init_from_file(str(mmproj).encode(), model.ptr, params)
    assert ctx, f"llama.cpp could not load {mmproj}"
    return ctx


def _mtmd_chunks(lib, ctx, text: str, images: list[np.ndarray]):
    """llama.cpp's tokenization of `text` with its media marker, one bitmap per image ([H, W, 3] uint8)."""
    bitmaps = (lib.mtmd_bitmap_p_ctypes * len(images))()
    for k, image in enumerate(images):
        data = (ctypes.c_uint8 * image.size).from_buffer_copy(np.ascontiguousarray(image).tobytes())
        bitmaps[k] = lib.mtmd_bitmap_init(image.shape[1], image.shape[0], data)
    raw = text.encode()
    chunks = lib.mtmd_input_chunks_init()
    assert lib.mtmd_tokenize(ctx, chunks, ctypes.byref(lib.mtmd_input_text(raw, len(raw), False, True)),
                             bitmaps, len(images)) == 0
    for bitmap in bitmaps:
        lib.mtmd_bitmap_free(bitmap)
    return chunks


def _chunk_list(lib, chunks):
    out = []
    for i in range(lib.mtmd_input_chunks_size(chunks)):
        chunk = lib.mtmd_input_chunks_get(chunks, i)
        if lib.mtmd_input_chunk_get_type(chunk) == lib.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            tokens = lib.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            out.append(("text", [tokens[j] for j in range(n.value)], chunk))
        else:
            out.append(("image", lib.mtmd_input_chunk_get_n_tokens(chunk), chunk))
    return out


def _our_image_sequence(llm, image_ids) -> torch.Tensor:
    """What our model puts at an image's [IMG]/[IMG_BREAK] positions (llama.cpp's image chunk = those,
    with [IMG_END] left as a text token)."""
    prompt_image = image_ids.images[0]
    with torch.no_grad():
        features = llm.vision([torch.from_numpy(prompt_image.pixels)])[0]
    embed = llm.model.model.embed_tokens.weight
    rows, k = [], 0
    for token in image_ids[prompt_image.start:prompt_image.end - 1]:
        if token == llm.tokenizer.image_tokens.img:
            rows.append(features[k])
            k += 1
        else:
            rows.append(embed[token])
    return torch.stack(rows)


def _mtmd_encode(lib, ctx, chunk, ids, img_break: np.ndarray) -> np.ndarray:
    """llama.cpp's embeddings for an image chunk ([IMG] and [IMG_BREAK] rows of `ids`'s first image).

    llama.cpp 0.3.36's pixtral graph fills its [IMG_BREAK] rows by scaling a freshly allocated, never
    written tensor by 0 and adding the embedding: where that memory held inf or NaN bits (in a process
    that freed attention masks of -inf, as this test session does) those rows come out NaN. Such rows
    must be [IMG_BREAK] rows and are given the embedding llama.cpp meant to write (the mmproj's own
    `v.token_embd.img_break`); every other value is llama.cpp's as computed."""
    image = ids.images[0]
    span = np.asarray(ids[image.start:image.end - 1])
    assert lib.mtmd_encode_chunk(ctx, chunk) == 0
    out = np.ctypeslib.as_array(lib.mtmd_get_output_embd(ctx), shape=(len(span), img_break.shape[0])).copy()
    broken = np.flatnonzero(~np.isfinite(out).all(axis=1))
    assert set(broken) <= set(np.flatnonzero(span != span[0])), "non-finite values outside [IMG_BREAK] rows"
    out[broken] = img_break
    return out


def _img_break(mmproj: Path) -> np.ndarray:
    import gguf

    tensor = next(t for t in gguf.GGUFReader(mmproj).tensors if t.name == "v.token_embd.img_break")
    return np.asarray(tensor.data, dtype=np.float32).reshape(-1)


@pytest.mark.parametrize("mmproj", ["exact", "quantize"])
def test_llama_cpp_reads_our_mmproj_and_gives_our_image_embeddings(files, gguf_llm, mtmd, mmproj):
    """An image whose sides are whole image tokens (no resize on either side): llama.cpp's embeddings
    for it, [IMG_BREAK] rows included, against ours. F32 projector: equal up to llama.cpp's GELU (a
    float16 table); the F16 one `devstral quantize` writes: correlation >= 0.999."""
    lib, _ = mtmd
    path = files[2] if mmproj == "exact" else files[1].with_name("mmproj-m3.gguf")
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)
    from PIL import Image

    ids = gguf_llm.tokenizer.encode_chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _png_url(Image.fromarray(pixels))}}]}], system_prompt=None)
    ours = _our_image_sequence(gguf_llm, ids).numpy()
    ctx = _mtmd_context(mtmd, path)
    try:
        chunks = _mtmd_chunks(lib, ctx, lib.mtmd_default_marker().decode(), [pixels])
        image_chunks = [c for c in _chunk_list(lib, chunks) if c[0] == "image"]
        assert len(image_chunks) == 1 and image_chunks[0][1] == len(ours) == 3 * 5 + 2
        theirs = _mtmd_encode(lib, ctx, image_chunks[0][2], ids, _img_break(path))
        lib.mtmd_input_chunks_free(chunks)
    finally:
        lib.mtmd_free(ctx)
    corr = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    assert corr >= 0.999
    if mmproj == "exact":
        assert np.abs(ours - theirs).max() <= 5e-3 * np.abs(ours).max()


@pytest.mark.parametrize("height, width", [(24, 40), (53, 37)])
def test_llama_cpp_with_our_mmproj_tokenizes_and_predicts_as_we_do(files, gguf_llm, mtmd, height, width):
    """The whole prompt through llama.cpp (our template's text with its media marker, its tokenizer, its
    image chunk, its decoder over the F32 GGUF and F32 mmproj): the same ids, image-token count and
    next-token logits as ours. 24x40 is whole image tokens (no resize); 53x37 is resized on both sides,
    by mistral-common's rule and by llama.cpp's own: the same grid, slightly different pixels."""
    import llama_cpp as llama

    lib, model = mtmd
    from PIL import Image

    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_url(Image.fromarray(
        pixels))}}, {"type": "text", "text": QUESTION}]}]
    ids = gguf_llm.tokenizer.encode_chat(messages, system_prompt=None)
    marker = lib.mtmd_default_marker().decode()
    text = gguf_llm.tokenizer.render_chat([{"role": "user", "content": marker + QUESTION}])
    ctx = _mtmd_context(mtmd, files[2])
    cparams = llama.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_threads, cparams.n_threads_batch = 256, 256, 2, 2
    cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32: an exact cache, as ours in fp32
    cparams.flash_attn_type = 0
    lctx = llama.llama_init_from_model(model.ptr, cparams)
    try:
        chunks = _mtmd_chunks(lib, ctx, text, [pixels])
        listed = _chunk_list(lib, chunks)
        image = ids.images[0]
        expected = [("text", list(ids[:image.start])), ("image", image.length - 1),
                    ("text", list(ids[image.end - 1:]))]
        assert [(kind, value) for kind, value, _ in listed] == expected
        # llama.cpp's own helpers decode the chunks: text, the encoded image (positions, batches), text
        n_past = llama.llama_pos(0)
        assert lib.mtmd_helper_eval_chunk_single(ctx, lctx, listed[0][2], 0, 0, 256, False, ctypes.byref(n_past)) == 0
        embeddings = _mtmd_encode(lib, ctx, listed[1][2], ids, _img_break(files[2]))
        pointer = embeddings.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        assert lib.mtmd_helper_decode_image_chunk(ctx, lctx, listed[1][2], pointer, n_past.value, 0, 256,
                                                  ctypes.byref(n_past), lib.mtmd_helper_post_decode_callback(), None) == 0
        assert lib.mtmd_helper_eval_chunk_single(ctx, lctx, listed[2][2], n_past.value, 0, 256, True,
                                                 ctypes.byref(n_past)) == 0
        assert n_past.value == len(ids)
        theirs = np.ctypeslib.as_array(llama.llama_get_logits_ith(lctx, -1), shape=(gguf_llm.config.vocab_size,))
        theirs = torch.from_numpy(theirs.copy())
        lib.mtmd_input_chunks_free(chunks)
    finally:
        llama.llama_free(lctx)
        lib.mtmd_free(ctx)
    ours = gguf_llm.logits(ids)[-1]
    assert theirs.argmax() == ours.argmax()
    if (height, width) == (24, 40):  # measured 2e-4 of logits up to 2.3: llama.cpp's GELU is a float16 table
        assert (ours - theirs).abs().max().item() <= 1e-3
    else:  # measured 0.03: the two resizes' pixels differ
        assert torch.corrcoef(torch.stack([ours, theirs]))[0, 1] >= 0.999


def _png_url(image) -> str:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return data_url(buf.getvalue())


def test_finetune_gguf_writes_the_projector_beside_it(files, tmp_path):
    """LoRA trains the text decoder; the base's vision tower goes out as mmproj-model-F32.gguf, and the
    GGUF loads with it (found beside) and sees the image as the fine-tuned merged model does."""
    import json

    from devstral.cli import main

    ckpt = files[0]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi.", "completion": "hi"}) + "\n")
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(ckpt), "--data", str(data), "--output", str(out), "--max-steps", "1",
                 "--no-progress", "--gguf", "F32"]) == 0
    assert (out / "mmproj-model-F32.gguf").is_file()
    gguf = devstral.load(out / "model-F32.gguf", device="cpu", dtype="fp32", backend="torch", max_context=256)
    assert gguf.vision is not None
    messages = ask(png(24, 16, 5))
    ids = gguf.tokenizer.encode_chat(messages, system_prompt=None)
    assert list(ids) == mistral_common_encoding(ckpt, messages).tokens
    base = devstral.load(ckpt, device="cpu", dtype="fp32", backend="torch", max_context=256)
    with torch.no_grad():  # F16 projector: equal features up to its rounding
        a = gguf.vision([torch.from_numpy(ids.images[0].pixels)])[0]
        b = base.vision([torch.from_numpy(ids.images[0].pixels)])[0]
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] >= 0.999
