"""Which files a hub download fetches (the download itself needs a network and is not run here)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from devstral.cli import main
from devstral.errors import DevstralError
from devstral.formats.hub import _split, download, select_files, select_gguf, select_mmproj
from devstral.testing import make_tiny_checkpoint

# The file list of a Mistral repo that ships both layouts (as Devstral Small 2507 does).
BOTH = ["README.md", ".gitattributes", "SYSTEM_PROMPT.txt", "config.json", "consolidated.safetensors",
        "generation_config.json", "model-00001-of-00010.safetensors", "model-00010-of-00010.safetensors",
        "model.safetensors.index.json", "params.json", "tekken.json", "images/logo.png"]


def test_one_layout_only_hf_preferred():
    got = select_files(BOTH)
    assert "consolidated.safetensors" not in got
    assert {"model-00001-of-00010.safetensors", "model-00010-of-00010.safetensors", "model.safetensors.index.json",
            "config.json", "tekken.json", "SYSTEM_PROMPT.txt", "generation_config.json"} <= set(got)
    assert "README.md" not in got and "images/logo.png" not in got


def test_mistral_layout_when_it_is_the_only_one():
    got = select_files(["params.json", "consolidated.safetensors", "tekken.json", "tokenizer.model.v7"])
    assert got == ["consolidated.safetensors", "params.json", "tekken.json", "tokenizer.model.v7"]


def test_gguf_repo_without_quant_is_explained():
    with pytest.raises(DevstralError, match=":QUANT"):
        select_files(["Devstral-Q4_K_M.gguf", "README.md"])


@pytest.mark.parametrize("spec", ["not a repo", "a/b/c", "/abs/path", "org/"])
def test_bad_specs(spec):
    with pytest.raises(DevstralError):
        _split(spec)


# ------------------------------------------------------------------------------------------------
# org/repo:QUANT picks exactly that quant. The listing is what list_repo_files returns for a GGUF repo
# laid out as unsloth / bartowski publish them (top-level files, big quants split into folders, vision
# projectors beside them).

GGUF_REPO = [
    ".gitattributes", "README.md", "params.json", "tekken.json", "SYSTEM_PROMPT.txt",
    "Devstral-Small-2507-IQ4_NL.gguf", "Devstral-Small-2507-IQ4_XS.gguf",
    "Devstral-Small-2507-Q2_K.gguf", "Devstral-Small-2507-Q2_K_L.gguf", "Devstral-Small-2507-UD-Q2_K_XL.gguf",
    "Devstral-Small-2507-Q3_K_M.gguf", "Devstral-Small-2507-Q4_K_M.gguf", "Devstral-Small-2507-Q4_K_S.gguf",
    "Devstral-Small-2507-UD-Q4_K_XL.gguf", "Devstral-Small-2507-Q8_0.gguf", "Devstral-Small-2507-F16.gguf",
    "BF16/Devstral-Small-2507-BF16-00001-of-00002.gguf", "BF16/Devstral-Small-2507-BF16-00002-of-00002.gguf",
    "mmproj-F16.gguf", "mmproj-BF16.gguf", "mmproj-F32.gguf",
]


@pytest.mark.parametrize("quant,expected", [
    ("Q2_K", ["Devstral-Small-2507-Q2_K.gguf"]),
    ("Q2_K_L", ["Devstral-Small-2507-Q2_K_L.gguf"]),
    ("UD-Q2_K_XL", ["Devstral-Small-2507-UD-Q2_K_XL.gguf"]),
    ("q4_k_m", ["Devstral-Small-2507-Q4_K_M.gguf"]),
    ("Q4_K_XL", ["Devstral-Small-2507-UD-Q4_K_XL.gguf"]),
    ("F16", ["Devstral-Small-2507-F16.gguf"]),  # not BF16, not the mmproj-F16 vision projector
    ("BF16", ["BF16/Devstral-Small-2507-BF16-00001-of-00002.gguf",
              "BF16/Devstral-Small-2507-BF16-00002-of-00002.gguf"]),
    ("IQ4_NL", ["Devstral-Small-2507-IQ4_NL.gguf"]),
])
def test_quant_matches_exactly(quant, expected):
    from huggingface_hub.utils import filter_repo_objects

    got = select_gguf(GGUF_REPO, quant)
    assert got == expected
    # and huggingface_hub's own pattern matching (what snapshot_download fetches) selects just those
    assert sorted(filter_repo_objects(GGUF_REPO, allow_patterns=got)) == sorted(expected)


@pytest.mark.parametrize("quant", ["Q5_K_M", "K_M", "Q2", "16"])
def test_quant_not_there(quant):
    with pytest.raises(DevstralError, match="no GGUF file for quant"):
        select_gguf(GGUF_REPO, quant)


def test_two_models_with_the_quant_are_ambiguous():
    with pytest.raises(DevstralError, match="ambiguous"):
        select_gguf(["small/model-Q4_K_M.gguf", "large/model-Q4_K_M.gguf"], "Q4_K_M")


def test_split_gguf_with_a_missing_part():
    listing = [f for f in GGUF_REPO if not f.endswith("00002-of-00002.gguf")]
    with pytest.raises(DevstralError, match="split in 2 parts"):
        select_gguf(listing, "BF16")


# ------------------------------------------------------------------------------------------------
# Cache and offline mode. The cache is laid out the way huggingface_hub writes it (blobs, snapshot links,
# refs/main), and huggingface_hub's own cache reader must find every file in it before we rely on it.

REPO = "acme/Tiny-Devstral"


def _cache_repo(cache: Path, repo: str, files: dict[str, Path], commit: str = "0" * 40) -> Path:
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for name, src in files.items():
        data = src.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():  # a file fetched again (huggingface_hub keeps the link)
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    from huggingface_hub import try_to_load_from_cache

    for name in files:
        assert try_to_load_from_cache(repo, name, cache_dir=cache) == str(snapshot / name)
    return snapshot


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    """An isolated HF cache, no offline flags, and a hub that records every call (and has no network)."""
    import huggingface_hub

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for var in ("DEVSTRAL_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    calls: list[tuple] = []
    listings: dict[str, list[str]] = {}

    def list_repo_files(repo_id, **kw):
        calls.append(("list", repo_id))
        if repo_id not in listings:
            raise ConnectionError("no network in tests")
        return listings[repo_id]

    def snapshot_download(repo_id, *, allow_patterns=None, cache_dir=None, **kw):
        calls.append(("download", repo_id, tuple(allow_patterns or ())))
        from huggingface_hub.utils import filter_repo_objects

        wanted = list(filter_repo_objects(listings[repo_id], allow_patterns=allow_patterns))
        src = tmp_path / "remote" / repo_id
        return str(_cache_repo(Path(cache_dir), repo_id, {f: src / f for f in wanted}, commit="1" * 40))

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return SimpleNamespace(cache=cache, calls=calls, listings=listings, remote=tmp_path / "remote")


def _tiny_files(folder: Path) -> dict[str, Path]:
    make_tiny_checkpoint(folder, shards=2)
    (folder / "generation_config.json").write_text('{"temperature": 0.15}')
    return {p.name: p for p in folder.iterdir()}


def test_cached_model_runs_by_name_offline(hub, monkeypatch, capsys):
    _cache_repo(hub.cache, REPO, _tiny_files(hub.remote / "src"))
    monkeypatch.setenv("DEVSTRAL_OFFLINE", "1")
    assert main(["run", "hi", "--model", REPO, "-n", "2", "--raw"]) == 0
    assert hub.calls == []  # not one hub call


def test_cached_model_needs_no_network_even_online(hub):
    snapshot = _cache_repo(hub.cache, REPO, _tiny_files(hub.remote / "src"))
    assert download(REPO) == snapshot and hub.calls == []


def test_cached_quant_offline(hub, monkeypatch, tmp_path):
    from devstral.formats.gguf_write import export_gguf

    ckpt = make_tiny_checkpoint(tmp_path / "q")
    gguf_path = export_gguf(ckpt, tmp_path / "Tiny-Q8_0.gguf", "Q8_0")
    _cache_repo(hub.cache, REPO + "-GGUF", {"Tiny-Q8_0.gguf": gguf_path})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = download(REPO + "-GGUF:Q8_0")
    assert got.name == "Tiny-Q8_0.gguf" and hub.calls == []
    with pytest.raises(DevstralError, match="offline"):
        download(REPO + "-GGUF:Q4_K_M")  # that quant was never pulled


def test_incomplete_cache_goes_to_the_hub(hub):
    files = _tiny_files(hub.remote / REPO)
    partial = {k: v for k, v in files.items() if k != "model-00002-of-00002.safetensors"}
    _cache_repo(hub.cache, REPO, partial)  # an interrupted download
    hub.listings[REPO] = sorted(files)
    got = download(REPO)
    assert [c[0] for c in hub.calls] == ["list", "download"]
    assert (got / "model-00002-of-00002.safetensors").is_file()


def test_offline_refuses_the_hub_with_one_clear_line(hub, monkeypatch, capsys):
    monkeypatch.setenv("DEVSTRAL_OFFLINE", "1")
    code = main(["run", "hi", "--model", REPO])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "offline" in err and REPO in err and hub.calls == []


def test_offline_flag(hub, monkeypatch, capsys):
    monkeypatch.setenv("DEVSTRAL_OFFLINE", "0")  # restored after the test: --offline sets it
    assert main(["--offline", "pull", REPO]) == 2
    assert "offline" in capsys.readouterr().err and hub.calls == []
    assert os.environ["DEVSTRAL_OFFLINE"] == "1"


def test_pull_asks_the_hub_even_when_cached(hub, capsys):
    files = _tiny_files(hub.remote / REPO)
    _cache_repo(hub.cache, REPO, files)
    hub.listings[REPO] = sorted(files) + ["README.md", "consolidated.safetensors"]
    assert main(["pull", REPO]) == 0
    kinds = [c[0] for c in hub.calls]
    assert kinds == ["list", "download"]
    fetched = set(hub.calls[1][2])
    assert "consolidated.safetensors" not in fetched and "README.md" not in fetched  # one layout only
    assert {"model-00001-of-00002.safetensors", "config.json", "tekken.json"} <= fetched


def test_pull_quant_fetches_exactly_one_quant(hub, tmp_path):
    repo = "acme/Big-GGUF"
    hub.listings[repo] = GGUF_REPO
    for f in GGUF_REPO:
        (hub.remote / repo / f).parent.mkdir(parents=True, exist_ok=True)
        (hub.remote / repo / f).write_bytes(b"GGUF")
    got = download(repo + ":BF16", refresh=True)
    assert hub.calls[-1][2] == ("BF16/Devstral-Small-2507-BF16-00001-of-00002.gguf",
                                "BF16/Devstral-Small-2507-BF16-00002-of-00002.gguf", "mmproj-F16.gguf")
    assert got.name == "Devstral-Small-2507-BF16-00001-of-00002.gguf" and got.is_file()


# ------------------------------------------------------------------------------------------------
# org/repo:QUANT fetches the repo's vision projector with the model, as llama.cpp's -hf does.

@pytest.mark.parametrize("listing, model, expected", [
    (GGUF_REPO, "Devstral-Small-2507-Q4_K_M.gguf", "mmproj-F16.gguf"),
    # big quants in a subfolder use the projector at the top
    (GGUF_REPO, "BF16/Devstral-Small-2507-BF16-00001-of-00002.gguf", "mmproj-F16.gguf"),
    (["m-Q8_0.gguf", "mmproj-F32.gguf", "mmproj-BF16.gguf", "mmproj-Q8_0.gguf"], "m-Q8_0.gguf", "mmproj-BF16.gguf"),
    (["m-Q8_0.gguf", "mmproj-model-f32.gguf", "mmproj-q8_0.gguf"], "m-Q8_0.gguf", "mmproj-model-f32.gguf"),
    (["m-Q8_0.gguf", "mmproj-q8_0.gguf"], "m-Q8_0.gguf", "mmproj-q8_0.gguf"),
    # the nearest folder wins over a better type further away; another folder's projector is not this model's
    (["mmproj-F16.gguf", "Q8/m-Q8_0.gguf", "Q8/mmproj-F32.gguf"], "Q8/m-Q8_0.gguf", "Q8/mmproj-F32.gguf"),
    (["m-Q8_0.gguf", "vision/mmproj-F16.gguf"], "m-Q8_0.gguf", None),
    (["m-Q8_0.gguf", "README.md", "mmproj-F16.bin"], "m-Q8_0.gguf", None),
])
def test_select_mmproj(listing, model, expected):
    from huggingface_hub.utils import filter_repo_objects

    got = select_mmproj(listing, model)
    assert got == expected
    if got is not None:  # huggingface_hub's own matching fetches the model files and that one projector
        wanted = [model, got]
        assert sorted(filter_repo_objects(listing, allow_patterns=wanted)) == sorted(wanted)


@pytest.fixture(scope="module")
def vision_files(tmp_path_factory):
    """A tiny Mistral 3 checkpoint as a hub GGUF repo would ship it: the model in a quant subfolder, the F16
    and F32 projectors at the top (real files, made by our exporter; test_vision_gguf checks them in llama.cpp)."""
    from devstral.formats.gguf_mmproj import export_mmproj
    from devstral.formats.gguf_write import export_gguf

    root = tmp_path_factory.mktemp("hub_vision")
    ckpt = make_tiny_checkpoint(root / "m3", arch="ministral3", wrap_mistral3=True, seed=3)
    files = {"F32/m3-F32.gguf": export_gguf(ckpt, root / "m3-F32.gguf", "F32"),
             "mmproj-F16.gguf": export_mmproj(ckpt, root / "mmproj-F16.gguf", ftype="F16"),
             "mmproj-F32.gguf": export_mmproj(ckpt, root / "mmproj-F32.gguf", ftype="F32")}
    return ckpt, files


def _publish(hub, repo: str, files: dict[str, Path]) -> None:
    hub.listings[repo] = sorted(files) + ["README.md"]
    for name, src in files.items():
        (hub.remote / repo / name).parent.mkdir(parents=True, exist_ok=True)
        (hub.remote / repo / name).write_bytes(src.read_bytes())
    (hub.remote / repo / "README.md").write_text("# m3")


def test_model_quant_fetches_the_projector_and_the_model_sees_images(hub, vision_files, capfd):
    """--model org/repo:QUANT downloads the F16 projector beside the quant's folder, and the loader finds it
    there: the image prompt's ids equal mistral-common's for the original checkpoint."""
    import devstral
    from test_vision import ask, mistral_common_encoding, png

    ckpt, files = vision_files
    _publish(hub, "acme/M3-GGUF", files)
    llm = devstral.load("acme/M3-GGUF:F32", device="cpu", dtype="fp32", backend="torch", max_context=256)
    assert hub.calls == [("list", "acme/M3-GGUF"), ("download", "acme/M3-GGUF", ("F32/m3-F32.gguf", "mmproj-F16.gguf"))]
    err = capfd.readouterr().err
    assert "vision projector mmproj-F16.gguf" in err and "mmproj-F16.gguf (found beside the model" in err
    assert llm.vision is not None
    messages = ask(png(24, 40, 5))
    assert list(llm.tokenizer.encode_chat(messages, system_prompt=None)) == mistral_common_encoding(ckpt, messages).tokens
    # cached now: the next load asks the hub nothing and finds the same projector
    hub.calls.clear()
    again = devstral.load("acme/M3-GGUF:F32", device="cpu", dtype="fp32", backend="torch", max_context=256)
    assert hub.calls == [] and again.vision is not None


def test_no_mmproj_skips_the_projector(hub, vision_files, capsys):
    _, files = vision_files
    _publish(hub, "acme/M3-GGUF", files)
    assert main(["pull", "acme/M3-GGUF:F32", "--no-mmproj"]) == 0
    assert hub.calls[-1] == ("download", "acme/M3-GGUF", ("F32/m3-F32.gguf",))
    hub.cache.joinpath("models--acme--M3-GGUF").rename(hub.cache / "gone")  # not cached: --model downloads again
    assert main(["run", "hi", "--model", "acme/M3-GGUF:F32", "--no-mmproj", "-n", "1", "--raw",
                 "--backend", "torch"]) == 0
    assert hub.calls[-1] == ("download", "acme/M3-GGUF", ("F32/m3-F32.gguf",))
    assert main(["pull", "acme/M3-GGUF:F32"]) == 0  # pull adds the projector to the cached quant
    assert hub.calls[-1] == ("download", "acme/M3-GGUF", ("F32/m3-F32.gguf", "mmproj-F16.gguf"))
