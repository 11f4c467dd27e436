"""A tiny Q4_K_M GGUF's greedy decode in the engine on a CUDA GPU, with an environment switch off then on: the
tokens of two prompts, one row at a time, for each setting (the GPU tests of decode switches compare them)."""

from __future__ import annotations

import torch


def greedy_off_and_on(tmp_path, monkeypatch, env: str, installed) -> list[list[list[int]]]:
    """[tokens with env=0, tokens with env=1]; installed(model) -> list of bools, one a layer, must be all True
    with the switch on and all False with it off (else the comparison would test nothing)."""
    import devstral
    from devstral.engine.engine import Engine, EngineConfig
    from devstral.engine.sampling import SamplingParams
    from devstral.formats.gguf import export_gguf
    from devstral.testing import make_tiny_checkpoint

    ck = make_tiny_checkpoint(tmp_path / "ck", inner_vocab=500, dim=512, hidden_dim=1536, n_layers=4, n_heads=8,
                              n_kv_heads=2, head_dim=64)
    path = export_gguf(ck, tmp_path / "m.gguf", "Q4_K_M")
    greedy = SamplingParams(temperature=0.0)
    prompts = [list(range(1, 40)), list(range(50, 70))]
    outs = []
    for flag in ("0", "1"):
        monkeypatch.setenv(env, flag)
        llm = devstral.load(path, device="cuda", prefix_caching=False)
        engine = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=1, speculative="off", prefix_caching=False),
                        compute_dtype=torch.bfloat16, plan=(1024, 16384))
        on = installed(llm.model)
        assert all(on) if flag == "1" else not any(on)
        toks = []
        for prompt in prompts:  # one row at a time: every decode step takes the one-row paths
            seq = engine.add(prompt, greedy, 48, set())
            while engine.has_work():
                engine.step()
            toks.append(seq.token_ids[seq.num_prompt_tokens:])
        outs.append(toks)
    return outs
