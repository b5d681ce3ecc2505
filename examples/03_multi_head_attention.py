"""Step 3 of the learning path: many heads, and sharing keys/values between them (GQA, MQA).

One head produces one attention pattern: each position can gather from one "kind" of place at a
time. Multi-head attention splits d_model into ``n_heads`` slices of ``head_dim`` and runs that many
heads side by side, each with its own pattern (one can look at the previous token while another looks
for the subject of the sentence); ``w_o`` then mixes their outputs back into the residual stream.
All heads come from one fused projection ``w_qkv``, so the cost is the same as one wide head.

When generating, the keys and values of every past token are kept in a cache (step 8), and that
cache -- not the weights -- is what fills memory. Grouped-query attention (GQA, Llama 2/3) lets a group
of query heads share one key/value head; multi-query attention (MQA) is the extreme of one shared
key/value head. ``Config.n_kv_heads`` picks: n_heads (MHA), fewer (GQA) or 1 (MQA).

Run:  python examples/03_multi_head_attention.py
"""

import torch
from einops import rearrange, repeat

import ftransformer as ft


def main() -> None:
    # ---------------------------------------------------------------- 1. the shapes of many heads
    # d_model = 48 split into 6 heads of head_dim 8. Biases off, to keep the weight surgery in part 3 short.
    base = ft.Config(vocab_size=100, d_model=48, n_heads=6, n_layers=1, d_ff=96, max_seq_len=16, bias=False)
    batch, seq = 2, 5
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, base.d_model, generator=gen)
    # Who may see whom, built once from the positions and shared by every attention call below.
    mask = ft.layers.self_mask(torch.arange(seq))

    print(f"1. q, k, v for x of shape {tuple(x.shape)} (batch, seq, d_model), {base.n_heads} query heads")
    print(f"   {'variant':<7} {'n_kv_heads':>10} {'w_qkv':>10} {'q':>14} {'k and v':>14} {'output':>12}")
    for name, n_kv in (("MHA", 6), ("GQA", 2), ("MQA", 1)):
        cfg = base.replace(n_kv_heads=n_kv)
        attn = ft.init_params(cfg, seed=0)["blocks"][0]["attn"]
        q, k, v = ft.layers.project_qkv(attn, x, cfg)
        out = ft.layers.multi_head_attention(attn, x, cfg, mask=mask)
        print(f"   {name:<7} {n_kv:>10} {str(tuple(attn['w_qkv'].shape)):>10} {str(tuple(q.shape)):>14} "
              f"{str(tuple(k.shape)):>14} {str(tuple(out.shape)):>12}")
    # What to look at: q always has 6 heads, k and v have n_kv_heads; the output is back to d_model
    # whatever the variant, so the rest of the model never knows which one it got.

    # ---------------------------------------------------------------- 2. each head has its own pattern
    # At init (std 0.02) all scores are ~0 and every pattern is uniform. A larger init makes the heads'
    # random preferences visible -- a trained model's heads differ for better reasons.
    cfg = base.replace(init_std=0.2)
    attn = ft.init_params(cfg, seed=1)["blocks"][0]["attn"]
    q, k, _ = ft.layers.project_qkv(attn, x[0], cfg)
    q = rearrange(q, "heads seq head_dim -> heads 1 seq head_dim")  # one group per key/value head
    patterns = ft.layers.attention_pattern(q, k, mask.allowed)
    print()
    print(f"2. where the last position looks, head by head (weights on positions 0..{seq - 1})")
    for h in range(cfg.n_heads):
        weights = patterns[h, 0, -1]
        row = " ".join(f"{w:.2f}" for w in weights.tolist())
        print(f"   head {h}: {row}   -> mostly position {int(weights.argmax())}")

    # ---------------------------------------------------------------- 3. GQA is MHA with copied k/v heads
    # Query head h of a GQA layer reads key/value head h // group. Copying each key/value head's
    # projection ``group`` times gives an ordinary MHA layer that computes exactly the same thing: GQA
    # removes redundant weights (and cache), it does not change what attention is.
    gqa_cfg = base.replace(n_kv_heads=2)
    mha_cfg = base.replace(n_kv_heads=base.n_heads)
    gqa = ft.init_params(gqa_cfg, seed=2)["blocks"][0]["attn"]
    hd, group = base.head_dim, base.n_heads // gqa_cfg.n_kv_heads
    w_q, w_k, w_v = gqa["w_qkv"].split([base.n_heads * hd, gqa_cfg.n_kv_heads * hd, gqa_cfg.n_kv_heads * hd], dim=-1)

    def copy_heads(w: torch.Tensor) -> torch.Tensor:
        return repeat(w, "d_model (kv_heads head_dim) -> d_model (kv_heads group head_dim)", head_dim=hd, group=group)

    mha = {"w_qkv": torch.cat([w_q, copy_heads(w_k), copy_heads(w_v)], dim=-1), "w_o": gqa["w_o"]}
    out_gqa = ft.layers.multi_head_attention(gqa, x, gqa_cfg, mask=mask)
    out_mha = ft.layers.multi_head_attention(mha, x, mha_cfg, mask=mask)
    print()
    print(f"3. GQA (2 key/value heads, groups of {group}) vs MHA with each key/value head copied {group} times")
    print(f"   w_qkv {tuple(gqa['w_qkv'].shape)} -> {tuple(mha['w_qkv'].shape)}; "
          f"max |GQA - MHA| = {float((out_gqa - out_mha).abs().max()):.1e}")

    # ---------------------------------------------------------------- 4. what sharing saves, at GPT-2 size
    # Parameter counts come from shapes alone (param_breakdown), so a GPT-2-sized table costs nothing.
    # The cache holds one key and one value vector per key/value head, per layer, per token.
    gpt2 = ft.PRESETS["gpt2"]
    print()
    print(f"4. GPT-2 small ({gpt2.n_layers} layers, {gpt2.n_heads} heads of {gpt2.head_dim}): "
          "attention weights and KV-cache")
    print(f"   {'variant':<8} {'n_kv_heads':>10} {'attention weights':>18} {'vs MHA':>7} "
          f"{'cache/token (bf16)':>19} {'cache @1024 tokens':>19}")
    mha_weights = None
    for name, n_kv in (("MHA", 12), ("GQA", 4), ("GQA", 2), ("MQA", 1)):
        cfg = gpt2.replace(n_kv_heads=n_kv)
        weights = dict(ft.params.param_breakdown(cfg)["rows"])["attention weights"]
        mha_weights = mha_weights or weights
        cache_bytes = 2 * cfg.n_layers * n_kv * cfg.head_dim * 2  # k and v, every layer, 2 bytes each
        print(f"   {name:<8} {n_kv:>10} {weights:>18,} {weights / mha_weights:>7.0%} "
              f"{cache_bytes / 1024:>16.1f} KiB {cache_bytes * 1024 / 2**20:>15.1f} MiB")
    # What to look at: the query and output projections stay, so weights shrink by at most half;
    # the cache shrinks in proportion to n_kv_heads -- 12x for MQA -- and that is why GQA exists.


if __name__ == "__main__":
    main()
