"""Vision: the Pixtral encoder + projector and the whole multimodal forward against transformers'
Mistral3ForConditionalGeneration, prompt ids and pixels against mistral-common, the engine's image
embeddings and prefix cache, the mmproj GGUF against gguf-py's names, and bad images."""

from __future__ import annotations

import base64
import functools
import io
import struct
import zlib

import numpy as np
import pytest
import torch

import devstral
from devstral.errors import DevstralError
from devstral.testing import make_tiny_checkpoint

QUESTION = "What is in this image?"


@functools.cache
def _ckpt(tmp_root):
    return make_tiny_checkpoint(tmp_root / "m3", arch="ministral3", wrap_mistral3=True, seed=3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _ckpt(tmp_path_factory.mktemp("vision"))


@pytest.fixture(scope="module")
def llm(ckpt):
    return devstral.load(ckpt, dtype="fp32", device="cpu", backend="torch", max_context=512)


@pytest.fixture(scope="module")
def hf(ckpt):
    from transformers import Mistral3ForConditionalGeneration

    return Mistral3ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()


def png(w: int, h: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(*images: bytes, text: str = QUESTION) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(d)}} for d in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def mistral_common_encoding(ckpt, messages):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok = MistralTokenizer.from_file(str(ckpt / "tekken.json"))
    return tok.encode_chat_completion(ChatCompletionRequest.from_openai(messages))


def hf_logits(hf, encoded) -> torch.Tensor:
    pixels = [torch.from_numpy(a) for a in encoded.images]
    H, W = max(p.shape[1] for p in pixels), max(p.shape[2] for p in pixels)
    batch = torch.zeros(len(pixels), 3, H, W)
    for i, p in enumerate(pixels):
        batch[i, :, :p.shape[1], :p.shape[2]] = p
    sizes = torch.tensor([list(p.shape[1:]) for p in pixels])
    with torch.no_grad():
        return hf(input_ids=torch.tensor([encoded.tokens]), pixel_values=batch, image_sizes=sizes).logits[0]


# ---------------------------------------------------------------------------------------------------

def test_features_equal_transformers_for_a_batch_of_sizes(llm, hf):
    """Images of different sizes in one call (block-diagonal attention) == transformers' padded batch."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 24, 40, generator=g), torch.randn(3, 16, 16, generator=g),
              torch.randn(3, 64, 8, generator=g)]
    with torch.no_grad():
        ours = llm.vision(images)
        batch = torch.zeros(3, 3, 64, 40)
        for i, im in enumerate(images):
            batch[i, :, :im.shape[1], :im.shape[2]] = im
        theirs = hf.model.get_image_features(batch, image_sizes=torch.tensor([list(im.shape[1:]) for im in images]))
        theirs = theirs.pooler_output if hasattr(theirs, "pooler_output") else theirs
    assert [t.shape[0] for t in ours] == [15, 4, 8]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_prompt_ids_and_pixels_equal_mistral_common(llm, ckpt):
    messages = ask(png(37, 53, 1), png(64, 20, 2), text="Compare them.")
    ids = llm.tokenizer.encode_chat(messages, system_prompt=None)
    ref = mistral_common_encoding(ckpt, messages)
    assert list(ids) == ref.tokens
    assert len(ids.images) == 2
    for image, pixels in zip(ids.images, ref.images, strict=True):
        np.testing.assert_array_equal(image.pixels, pixels)
        assert ref.tokens[image.end - 1] == llm.tokenizer.image_tokens.img_end
        assert image.num_embeddings == (pixels.shape[1] // 8) * (pixels.shape[2] // 8)


def test_logits_equal_transformers_mistral3(llm, ckpt, hf):
    """fp32, a real (random-pixel) PNG through mistral-common's preprocessing, two images."""
    messages = ask(png(37, 53, 3), png(30, 30, 4))
    ids = llm.tokenizer.encode_chat(messages, system_prompt=None)
    ref = hf_logits(hf, mistral_common_encoding(ckpt, messages))
    assert (llm.logits(ids) - ref).abs().max().item() <= 1e-4
    # through the paged KV cache in chunks that cut the images' tokens in pieces
    engine = llm.engine.teacher_forced_logits(ids, chunk=7)
    assert (engine - ref).abs().max().item() <= 1e-4


def test_prefix_cache_keys_hold_the_image_and_encoder_runs_once(llm):
    """Two images of one size give identical ids; they must not share cached keys/values. The same
    image again is served by the prefix cache (and the encoder is not run for it)."""
    a = llm.tokenizer.encode_chat(ask(png(32, 32, 10)), system_prompt=None)
    b = llm.tokenizer.encode_chat(ask(png(32, 32, 11)), system_prompt=None)
    assert list(a) == list(b) and a.images[0].digest != b.images[0].digest
    engine = llm.engine
    params = devstral.SamplingParams(temperature=0, max_tokens=1)
    first = llm.generate(a, params)
    encoded = engine.images.encoded_images
    other = llm.generate(b, params)
    image_start = a.images[0].start
    assert other.usage["prompt_tokens_details"]["cached_tokens"] <= image_start  # nothing past the text before it
    again = llm.generate(a, params)
    assert again.usage["prompt_tokens_details"]["cached_tokens"] >= a.images[0].end - engine.ec.block_size
    assert engine.images.encoded_images == encoded + 1  # b only
    # and the cached answer is the uncached one
    assert again.token_ids == first.token_ids
    ref_b = llm.logits(b)[-1].argmax().item()
    assert other.token_ids == [ref_b]


def test_raw_image_tokens_without_an_image_are_refused(llm):
    img = llm.tokenizer.image_tokens.img
    with pytest.raises(DevstralError, match="without their image"):
        llm.generate([1, img, img, 3], devstral.SamplingParams(max_tokens=1))


# ---------------------------------------------------------------------------------------------------
# bad input: one line naming the message and part

def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h pixels (valid CRC) followed by no image data: a decompression bomb's
    header, which must be refused before anything is decoded."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data, message", [
    (b"this is not an image", "not an image in a supported format"),
    (png(40, 40)[:-60], "corrupt or truncated image"),
    (_png_header_only(8000, 6000), "larger than the 40,000,000 pixel limit"),
    (_png_header_only(30000, 30000), "larger than the 40,000,000 pixel limit"),
    (png(8, 8, fmt="TIFF"), "not an image in a supported format"),
])
def test_bad_images_are_one_line_errors_naming_the_part(llm, data, message):
    with pytest.raises(DevstralError, match=message) as e:
        llm.tokenizer.encode_chat(ask(data), system_prompt=None)
    assert str(e.value).startswith("message 0: content part 0:") and "\n" not in str(e.value)


def test_remote_urls_and_bad_data_urls_are_refused(llm):
    for url, message in (("https://example.com/cat.png", "remote image URLs are not fetched"),
                         ("data:image/png;base64,@@@", "not valid base64"),
                         ("file:///etc/passwd", "unsupported image URL scheme")):
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        with pytest.raises(DevstralError, match=message):
            llm.tokenizer.encode_chat(msgs, system_prompt=None)


def test_text_only_model_refuses_an_image(tmp_path):
    text = devstral.load(make_tiny_checkpoint(tmp_path / "t"), dtype="fp32", device="cpu", backend="torch")
    with pytest.raises(DevstralError, match=r"message 0: content part 0: cannot take an image: .*text-only"):
        text.tokenizer.encode_chat(ask(png(16, 16)))


def test_no_vision_loads_text_only_with_a_notice(ckpt, capfd):
    text = devstral.load(ckpt, dtype="fp32", device="cpu", backend="torch", vision=False)
    assert text.vision is None and "skipped" in capfd.readouterr().err
    with pytest.raises(DevstralError, match="text-only"):
        text.tokenizer.encode_chat(ask(png(16, 16)))


# ---------------------------------------------------------------------------------------------------
# mmproj GGUF

def test_mmproj_names_are_gguf_pys_and_round_trip_gives_equal_features(llm, tmp_path):
    import gguf

    from devstral.formats.gguf_mmproj import load_mmproj, to_mmproj_name, write_mmproj
    from devstral.formats.gguf_read import GGUFFile

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, llm.vision.config.n_layers + 4)
    for name, _ in llm.vision.named_parameters():  # our table == gguf-py's for the HF names
        module, _, kind = name.rpartition(".")
        assert to_mmproj_name(name) == f"{table.get_name(module)}.{kind}", name
    embed = llm.model.model.embed_tokens.weight
    path = write_mmproj(llm.vision, tmp_path / "mmproj.gguf", ftype="F32",
                        img_break=embed[llm.tokenizer.image_tokens.img_break])
    reader = gguf.GGUFReader(path)  # gguf-py reads what we wrote
    assert str(bytes(reader.fields["clip.projector_type"].parts[-1]), "utf-8") == "pixtral"
    assert GGUFFile(path).metadata["general.architecture"] == "clip"
    back = load_mmproj(path, text_dim=llm.config.dim, image_token_id=llm.tokenizer.image_tokens.img,
                       dtype=torch.float32, device=torch.device("cpu"))
    ours, theirs = back.config.as_dict(), llm.vision.config.as_dict()
    for eps in ("norm_eps", "projector_norm_eps"):  # GGUF stores them as float32
        assert ours.pop(eps) == pytest.approx(theirs.pop(eps), rel=1e-6)
    assert ours == theirs
    g = torch.Generator().manual_seed(5)
    images = [torch.randn(3, 24, 16, generator=g), torch.randn(3, 8, 40, generator=g)]
    with torch.no_grad():
        for a, b in zip(llm.vision(images), back(images), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mmproj_of_another_model_is_refused(llm, tmp_path):
    from devstral.formats.gguf_mmproj import load_mmproj, write_mmproj

    path = write_mmproj(llm.vision, tmp_path / "mmproj.gguf")
    with pytest.raises(DevstralError, match="projection_dim 64 does not match the model's hidden size 128"):
        load_mmproj(path, text_dim=128, image_token_id=10, dtype=torch.float32, device=torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------
# the CLI

def test_run_image_prompt_ids_equal_mistral_common(ckpt, tmp_path, capsys):
    import json

    from devstral.cli import main

    image = tmp_path / "shot.png"
    image.write_bytes(png(45, 29, 8))
    assert main(["run", "--json", "-n", "2", "--temperature", "0", "--model", str(ckpt), "--image", str(image),
                 "--backend", "torch", QUESTION]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_token_ids"] == mistral_common_encoding(ckpt, ask(image.read_bytes())).tokens
    (tmp_path / "bad.png").write_bytes(b"GIF89a")
    assert main(["run", "--model", str(ckpt), "--image", str(tmp_path / "bad.png"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "bad.png: not an image in a supported format" in err and "Traceback" not in err


def test_chat_image_command_attaches_to_the_next_message(ckpt, tmp_path, monkeypatch, capsys):
    """`/image PATH` in `devstral chat`: a bad file is one error line and the REPL goes on; a good one goes
    with the next message, whose prompt ids equal mistral-common's for the file's bytes."""
    import devstral.engine.chat as chat_mod
    from devstral.cli import main

    shot, bad = tmp_path / "shot.png", tmp_path / "bad.png"
    shot.write_bytes(png(45, 29, 12))
    bad.write_bytes(b"GIF89a")
    lines = iter([f"/image {bad}", f"/image {shot}", QUESTION, "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    prompts = []
    original = chat_mod.ChatStream.__init__

    def spy(self, llm, messages, *a, **kw):
        prompts.append(list(llm.tokenizer.encode_chat(messages)))
        original(self, llm, messages, *a, **kw)

    monkeypatch.setattr(chat_mod.ChatStream, "__init__", spy)
    assert main(["chat", "--model", str(ckpt), "-n", "1", "--backend", "torch", "--no-system"]) == 0
    err = "".join(capsys.readouterr().err.split())  # rich wraps long lines (at a space, or inside a path)
    assert "bad.png:notanimageinasupportedformat" in err and "imageattached" in err
    assert prompts == [mistral_common_encoding(ckpt, ask(shot.read_bytes())).tokens]


def test_template_command_shows_image_tokens_as_mistral_common(ckpt, tmp_path, capsys):
    import json

    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from devstral.cli import main

    messages = [{"role": "system", "content": "Be brief."}, *ask(png(45, 29, 9))]
    request = tmp_path / "req.json"
    request.write_text(json.dumps(messages))
    assert main(["template", "--model", str(ckpt), "-r", str(request), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = mistral_common_encoding(ckpt, messages).tokens
    assert out["token_ids"] == ref
    assert out["prompt"] == MistralTokenizer.from_file(str(ckpt / "tekken.json")).decode(
        ref, special_token_policy=SpecialTokenPolicy.KEEP)


def test_quantize_writes_the_mmproj_and_a_gguf_with_it_sees_images(ckpt, tmp_path, capsys):
    from devstral.cli import main

    out = tmp_path / "m3.gguf"
    assert main(["quantize", str(ckpt), str(out), "--type", "F32", "--no-progress"]) == 0
    projector = tmp_path / "mmproj-m3.gguf"
    assert projector.is_file() and "vision projector" in capsys.readouterr().err
    from devstral.formats.gguf_mmproj import load_mmproj

    vision_llm = devstral.load(ckpt, dtype="fp32", device="cpu", backend="torch")
    back = load_mmproj(projector, text_dim=64, image_token_id=10, dtype=torch.float32, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(9)
    images = [torch.randn(3, 32, 24, generator=g)]
    with torch.no_grad():  # F16 matrices: equal up to F16 rounding
        for a, b in zip(vision_llm.vision(images), back(images), strict=True):
            corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
            assert corr >= 0.999
    # both backends take the projector (tests/test_vision_gguf.py checks the GGUF path's ids, logits and
    # llama.cpp's reading of the file; tests/test_llamacpp_vision.py the llama.cpp backend's images)
    gguf_llm = devstral.load(out, mmproj=projector, device="cpu", dtype="fp32", backend="torch")
    assert gguf_llm.backend == "torch" and gguf_llm.vision is not None
    with pytest.raises(DevstralError, match="--mmproj goes with a GGUF model"):
        devstral.load(ckpt, mmproj=projector)
