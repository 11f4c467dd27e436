"""Ablations for decode A/Bs: copies of source files with one launch taken out, giving wrong results on purpose, to
bound what fusing that launch away could buy before anyone builds it (docs/architecture.md, session 26).

    python benchmarks/ablations.py --out /tmp/abl        # writes the copies, prints decode_ab.py --setting args
    python benchmarks/decode_ab.py --gguf F --setting base $(python benchmarks/ablations.py --out /tmp/abl)

  nomerge     the decode attention's pass 2 (the split merge) not launched: o reads an unwritten output
  nopostnorm  the post-attention add + RMSNorm launches nothing at one decode row: gate/up reads a stale row and
              its int8 words (offered as the norm would offer them); the residual stream is not updated

Each is a string replacement in the file as it is now; an anchor that no longer matches is an error naming it, so
the ablation cannot silently measure the unmodified code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NOPOSTNORM = '''        if h.is_cuda and h.numel() == h.shape[-1] and self.post_attention_layernorm.xq_layouts:  # ABLATION
            from devstral.kernels import gguf_xq as _gx

            store = self.__dict__.setdefault("_ablation", {})
            key = (tuple(h.shape), h.dtype)
            if key not in store:  # empty, not zeros: a fill would be a launch inside the captured graph
                with torch.inference_mode(False):
                    stale = torch.empty(h.shape, dtype=x.dtype, device=h.device)
                words = {lay: torch.empty(1, h.shape[-1] // _gx.BLOCK, _gx.WORDS, dtype=torch.int32, device=h.device)
                         for lay in self.post_attention_layernorm.xq_layouts}
                store[key] = (stale, words)
            stale, words = store[key]
            _gx.offer(stale.view(1, -1), words)
            h = stale
        else:
            h, x = self.post_attention_layernorm.add_and_norm(x, h)
'''

# name: (file, anchor, replacement)
ABLATIONS = {
    "nomerge": ("src/devstral/kernels/paged_attention_triton.py",
                "            launch.merge_pass(splits, part_out, part_lse, context_lens, out, window, xq, layout)\n",
                "            pass  # ABLATION: no merge pass (wrong results on purpose)\n"),
    "nopostnorm": ("src/devstral/model/transformer.py",
                   "        h, x = self.post_attention_layernorm.add_and_norm(x, h)\n", NOPOSTNORM),
}


class AnchorMissing(ValueError):
    pass


def ablated(name: str, root: Path = ROOT) -> tuple[str, str]:
    """(the file's path in the tree, its ablated text)."""
    rel, anchor, replacement = ABLATIONS[name]
    text = (root / rel).read_text()
    if text.count(anchor) != 1:
        raise AnchorMissing(f"{name}: {rel} no longer holds its anchor once ({text.count(anchor)} times): "
                            f"{anchor.strip()!r}")
    return rel, text.replace(anchor, replacement)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the ablated copies")
    ap.add_argument("names", nargs="*", default=sorted(ABLATIONS), help="ablations (default: all)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    settings = []
    try:
        for name in a.names:
            if name not in ABLATIONS:
                raise AnchorMissing(f"no ablation {name!r} (known: {', '.join(sorted(ABLATIONS))})")
            rel, text = ablated(name)
            copy = a.out / f"{name}_{Path(rel).name}"
            copy.write_text(text)
            compile(text, str(copy), "exec")
            settings.append(f"--setting {name}:{rel}<-{copy}")
    except AnchorMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(" ".join(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
