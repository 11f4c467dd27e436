""""org/repo[:QUANT]" -> local files through huggingface_hub. The only place that downloads weights.

Called only when the user names a hub repo (`--model org/repo`, `devstral pull`). With `:QUANT`
(e.g. `unsloth/Devstral-Small-2507-GGUF:Q4_K_M`) only the GGUF file(s) of exactly that quant are
fetched: `:Q2_K` is not `Q2_K_L` or `UD-Q2_K_XL`, and `:F16` is not `BF16`. When the repo ships a vision
projector (`mmproj*.gguf`), one is fetched with the model, as llama.cpp's `-hf` does (`select_mmproj`:
F16, then BF16, F32, others), where the loader's auto-discovery finds it; `mmproj=False` skips it.

A model already in the local Hugging Face cache (the layout huggingface_hub writes:
`models--org--repo/refs/main` -> `snapshots/<commit>/...`) is used from there by name without
touching the network, the way `ollama run` uses a pulled model; `devstral pull` always asks the hub
for the newest files. Offline mode ($DEVSTRAL_OFFLINE=1, `devstral --offline`, or huggingface_hub's
$HF_HUB_OFFLINE=1) never reaches the hub: the cache or a clear error.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from devstral.errors import DevstralError

_HF_WEIGHTS = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$|^model\.safetensors\.index\.json$")
_MISTRAL_WEIGHTS = re.compile(r"^consolidated(-\d+-of-\d+|\.\d+)?\.safetensors$|^consolidated\.safetensors\.index\.json$")
_SIDE_FILES = re.compile(r"^(config|params|generation_config|tokenizer|tokenizer_config|special_tokens_map)\.json$|"
                         r"^tekken.*\.json$|^tokenizer\.model(\.v\d+\w*)?$|^SYSTEM_PROMPT\.txt$|^chat_template\.jinja$")
# "name-00001-of-00003.gguf": llama.cpp's split naming (gguf-split).
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<total>\d{5})$")
# Characters that may stand before a quant label in a file name ("model-Q4_K_M", "model.Q4_K_M").
_LABEL_SEPARATORS = "-./"
_TRUE = ("1", "true", "yes", "on")


def offline() -> bool:
    """Whether hub access is forbidden: $DEVSTRAL_OFFLINE (or `devstral --offline`), or $HF_HUB_OFFLINE."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("DEVSTRAL_OFFLINE", "HF_HUB_OFFLINE"))


def cache_dir() -> Path:
    """huggingface_hub's cache folder, read at call time ($HF_HUB_CACHE, else $HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def select_files(files: list[str]) -> list[str]:
    """The files a text model folder needs: ONE weight layout (HF preferred, as the loader prefers it;
    Mistral repos often carry both, and fetching both doubles a 47 GB download) plus config/tokenizer."""
    top = [f for f in files if "/" not in f]
    hf = [f for f in top if _HF_WEIGHTS.match(f)]
    weights = hf or [f for f in top if _MISTRAL_WEIGHTS.match(f)]
    if not weights:
        raise DevstralError("no safetensors weights in this repo (for a GGUF repo, add :QUANT, e.g. :Q4_K_M)")
    return sorted(weights + [f for f in top if _SIDE_FILES.match(f)])


@dataclass(frozen=True)
class _GGUFGroup:
    stem: str  # path without ".gguf" and without the split suffix
    files: tuple[str, ...]  # sorted; the first part first
    total: int  # parts the names announce (1 for an unsplit file)


def _gguf_groups(files: list[str]) -> list[_GGUFGroup]:
    """The repo's model GGUFs, split parts grouped; vision projectors (mmproj) left out."""
    groups: dict[str, list[str]] = {}
    totals: dict[str, int] = {}
    for f in files:
        if not f.lower().endswith(".gguf") or Path(f).name.lower().startswith("mmproj"):
            continue
        stem = f[: -len(".gguf")]
        m = _SPLIT.match(stem)
        if m:
            stem = m["stem"]
            totals[stem] = int(m["total"])
        groups.setdefault(stem, []).append(f)
    return [_GGUFGroup(s, tuple(sorted(fs)), totals.get(s, 1)) for s, fs in sorted(groups.items())]


def _label_matches(stem: str, quant: str) -> bool:
    """Whether a file stem ends with exactly the quant label: "m-Q2_K" is Q2_K, "m-Q2_K_L" and "m-BF16"
    (for F16) are not."""
    stem, quant = stem.lower(), quant.lower()
    if not stem.endswith(quant):
        return False
    before = stem[: -len(quant)]
    return before == "" or before[-1] in _LABEL_SEPARATORS


def select_gguf(files: list[str], quant: str, repo: str = "") -> list[str]:
    """The GGUF file(s) of exactly `quant` in a repo listing (all parts of a split file, first part first)."""
    where = f"{repo}: " if repo else ""
    groups = _gguf_groups(files)
    matches = [g for g in groups if _label_matches(g.stem, quant)]
    if not matches:
        available = ", ".join(Path(g.stem).name for g in groups[:12]) or "none"
        raise DevstralError(f"{where}no GGUF file for quant {quant!r} (model files: {available})")
    if len(matches) > 1:
        names = ", ".join(g.files[0] for g in matches)
        raise DevstralError(f"{where}quant {quant!r} is ambiguous: {names}; give the full label")
    group = matches[0]
    if len(group.files) != group.total:
        raise DevstralError(f"{where}{group.stem}.gguf is split in {group.total} parts but the repo lists "
                            f"{len(group.files)}")
    return list(group.files)


# The projector a quant gets, best first: F16 is what llama.cpp's converter writes by default and loses
# nothing that matters for a vision tower; BF16 and F32 are the same weights, larger or less portable.
_MMPROJ_PREFERENCE = ("f16", "bf16", "f32")


def _mmproj_rank(name: str) -> int:
    tags = Path(name).name.lower()[len("mmproj"):-len(".gguf")].replace("_", "-").replace(".", "-").split("-")
    return next((i for i, t in enumerate(_MMPROJ_PREFERENCE) if t in tags), len(_MMPROJ_PREFERENCE))


def select_mmproj(files: list[str], model: str) -> str | None:
    """The vision projector to fetch with the GGUF `model` (a path in the repo listing), or None.

    Candidates are `mmproj*.gguf` files in the model's folder or a folder above it (a repo that keeps
    big quants in subfolders keeps one projector at the top), the nearest folder first, as llama.cpp's
    `-hf` picks; then F16, BF16, F32, any other; then by name. The loader finds it beside the model
    (formats/gguf_mmproj.find_mmproj), in the same snapshot."""
    model_dir = Path(model).parent.parts
    candidates = []
    for f in files:
        path = Path(f)
        if not (path.name.lower().startswith("mmproj") and path.name.lower().endswith(".gguf")):
            continue
        folder = path.parent.parts
        if model_dir[:len(folder)] != folder:
            continue  # a projector in another quant's folder (or another model's) is not this one's
        candidates.append((-len(folder), _mmproj_rank(f), f))
    return min(candidates)[2] if candidates else None


def _split(spec: str) -> tuple[str, str | None]:
    repo, _, quant = spec.partition(":")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or (quant and not re.fullmatch(r"[\w.-]+", quant)):
        raise DevstralError(f"{spec!r} is not a hub repo id (expected org/repo or org/repo:QUANT)")
    return repo, quant or None


def cached_snapshot(repo: str, cache: Path | None = None) -> Path | None:
    """The snapshot folder of the repo's main revision in the local HF cache, or None."""
    storage = (cache or cache_dir()) / f"models--{repo.replace('/', '--')}"
    try:
        commit = (storage / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    snapshot = storage / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


def _cached_files(snapshot: Path) -> list[str]:
    """Files present in a snapshot (a link whose blob is missing, e.g. an interrupted download, is not)."""
    out = []
    for root, _, names in os.walk(snapshot):
        for name in names:
            p = Path(root) / name
            if p.is_file():  # follows the blob symlink
                out.append(p.relative_to(snapshot).as_posix())
    return sorted(out)


def _from_cache(repo: str, quant: str | None) -> Path | None:
    """A complete cached copy of what `download` would fetch, or None."""
    snapshot = cached_snapshot(repo)
    if snapshot is None:
        return None
    files = _cached_files(snapshot)
    try:
        if quant is not None:
            return snapshot / select_gguf(files, quant)[0]
        wanted = select_files(files)
    except DevstralError:
        return None
    from devstral.config import read_json

    for index in (f for f in wanted if f.endswith(".index.json")):
        data = read_json(snapshot / index)
        shards = set((data.get("weight_map") or {}).values()) if isinstance(data, dict) else set()
        if not shards <= set(files):
            return None  # an interrupted download of a sharded model
    return snapshot


def download(spec: str, *, refresh: bool = False, mmproj: bool = True) -> Path:
    """A folder or .gguf path for `spec`: from the local cache when it is complete there (unless
    `refresh`, which `devstral pull` sets), else downloaded. Offline, only the cache is used.

    For `org/repo:QUANT`, `mmproj` also fetches the repo's vision projector (select_mmproj) into the
    same snapshot. A quant already cached is used as it is (no hub call to ask whether the repo has a
    projector); `devstral pull` adds a missing one."""
    repo, quant = _split(spec)
    if not refresh or offline():
        cached = _from_cache(repo, quant)
        if cached is not None:
            return cached
    if offline():
        raise DevstralError(f"{spec}: offline mode (DEVSTRAL_OFFLINE / --offline / HF_HUB_OFFLINE) forbids hub "
                            f"access, and {repo} is not complete in the local cache {cache_dir()}; pull it "
                            "with network first or pass a local folder or file with --model")
    try:
        from huggingface_hub import list_repo_files, snapshot_download

        files = list_repo_files(repo)
        if quant is None:
            try:
                wanted = select_files(files)
            except DevstralError as e:
                raise DevstralError(f"{repo}: {e}") from None
            return Path(snapshot_download(repo, allow_patterns=wanted, cache_dir=cache_dir()))
        wanted = select_gguf(files, quant, repo)
        projector = select_mmproj(files, wanted[0]) if mmproj else None
        folder = Path(snapshot_download(repo, allow_patterns=wanted + ([projector] if projector else []),
                                        cache_dir=cache_dir()))
        if projector:
            print(f"note: {repo}: vision projector {projector} downloaded with the model (--no-mmproj skips it)",
                  file=sys.stderr)
        return folder / wanted[0]  # split GGUFs: the loader finds the other parts next to the first
    except DevstralError:
        raise
    except Exception as e:  # offline, unknown repo, gated repo, no disk: all are the user's to fix
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise DevstralError(f"cannot download {spec}: {reason} (no network? pass a local folder or file "
                            "with --model)") from None
