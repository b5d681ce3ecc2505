"""Step 8 of the learning path: the KV-cache as explicit state, and generation.

A decoder generates one token at a time, and each new token attends to every token before it. Their
keys and values never change once computed, so we keep them: the KV-cache. Without it, every new token
re-runs the model over the whole sequence so far (quadratic work); with it, a step runs the model over
one token and reads the stored keys and values.

Here the cache is *data*, not a hidden buffer inside a module: ``init_cache`` makes it,
``forward_with_cache(params, tokens, cache, cfg)`` returns the logits *and a new cache*, and the cache
passed in is left as it was. The buffers have a fixed size (``max_len`` slots), so shapes never change
from step to step -- which is also what lets ``torch.compile`` reuse one graph for every step.

Run:  python examples/08_kv_cache.py [--new-tokens N] [--threads T]
"""

import argparse
import time

import torch

import ftransformer as ft


def filled(cache: ft.KVCache, row: int = 0) -> str:
    """One character per slot of layer 0's key buffer: '#' where a key is stored, '.' where empty."""
    used = cache.k[0][row].abs().sum(dim=(0, -1)) > 0
    return "".join("#" if u else "." for u in used.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128, help="longest generation in the speed test")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see below)")
    args = parser.parse_args()
    # One sequence, one token at a time: each product is too small to split across threads, and on a
    # busy machine extra threads mostly wait for each other.
    torch.set_num_threads(args.threads)

    cfg = ft.Config(vocab_size=500, d_model=96, n_heads=6, n_kv_heads=2, n_layers=3, d_ff=256, max_seq_len=128)
    params = ft.init_params(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)

    # ---------------------------------------------------------------- 1. the cache is a pytree of buffers
    cache = ft.init_cache(cfg, batch_size=1, max_len=24)
    print("1. an empty cache: one key and one value buffer per layer, plus the filled length of each row")
    print(f"   {len(cache.k)} layers x k, v of shape {tuple(cache.k[0].shape)} (batch, kv_heads, max_len, head_dim)")
    print(f"   lengths = {cache.lengths.tolist()}")
    # What to look at: kv_heads is 2, not n_heads=6 -- with grouped-query attention three query heads
    # share each key/value head, so the cache is three times smaller than multi-head attention's.

    # ---------------------------------------------------------------- 2. prefill, then decode
    # The prompt goes in at once (prefill); then one token per step (decode). The buffers keep their
    # shape; what grows is the number of filled slots, and each token's position is its slot.
    prompt = torch.randint(0, cfg.vocab_size, (1, 7), generator=gen)
    print()
    print("2. filling the cache (layer 0's slots: # holds a key)")
    logits, cache = ft.forward_with_cache(params, prompt, cache, cfg)
    print(f"   prefill {prompt.shape[-1]} tokens  lengths={cache.lengths.tolist()}  {filled(cache)}"
          f"  logits {tuple(logits.shape)}")
    states = [cache]
    token = logits[:, -1].argmax(-1)
    for _ in range(4):
        logits, cache = ft.decode_step(params, token, cache, cfg)
        states.append(cache)
        token = logits.argmax(-1)
        print(f"   decode 1 token   lengths={cache.lengths.tolist()}  {filled(cache)}  logits {tuple(logits.shape)}")
    print(f"   buffer shape at the end: {tuple(cache.k[0].shape)} (unchanged)")
    # Every intermediate cache is still intact: updating returned a new one each time.
    print(f"   the cache after prefill still has lengths={states[0].lengths.tolist()}  {filled(states[0])}")

    # ---------------------------------------------------------------- 3. cached == uncached
    # The cache changes how much work is done, never the answer: decoding token by token gives the
    # logits a full forward pass gives at every position.
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=gen)
    full = ft.forward(params, tokens, cfg)
    cache = ft.init_cache(cfg, batch_size=2, max_len=20)
    pieces = []
    for start, size in ((0, 8), *((i, 1) for i in range(8, 20))):
        step_logits, cache = ft.forward_with_cache(params, tokens[:, start : start + size], cache, cfg)
        pieces.append(step_logits)
    diff = float((torch.cat(pieces, dim=1) - full).abs().max())
    print()
    print("3. prefill 8 tokens, then decode 12 one at a time, against one forward over all 20")
    print(f"   max |cached - uncached| = {diff:.1e}")

    # ---------------------------------------------------------------- 4. ragged batches
    # Prompts of different lengths share a batch with right padding: each row's length says where its
    # next token goes (row 1 continues at slot 3 while row 0 continues at slot 6).
    prompts = torch.randint(0, cfg.vocab_size, (2, 6), generator=gen)
    lengths, greedy = torch.tensor([6, 3]), ft.Sampling(temperature=0)
    out = ft.generate(params, prompts, cfg, max_new_tokens=5, sampling=greedy, seq_lengths=lengths, pad_id=-1)
    alone = ft.generate(params, prompts[1, :3], cfg, max_new_tokens=5, sampling=greedy)
    print()
    print("4. a ragged batch: prompts of 6 and 3 tokens, 5 new tokens each (-1 = padding)")
    for row in range(2):
        print(f"   row {row}: {out[row].tolist()}")
    print(f"   row 1 alone: {alone.tolist()}  same: {torch.equal(out[1, :8], alone)}")

    # ---------------------------------------------------------------- 5. memory
    # The price of the cache is memory: 2 (k and v) x layers x kv_heads x max_len x head_dim numbers
    # per sequence. GQA and MQA shrink it by sharing key/value heads.
    print()
    print("5. cache size per sequence at full context (float32)")
    for name, c in (("GPT-2 small", ft.PRESETS["gpt2"]), ("  with GQA 4 kv heads", ft.PRESETS["gpt2"].replace(n_kv_heads=4)),
                    ("  with MQA", ft.PRESETS["gpt2"].replace(n_kv_heads=1))):
        size = 2 * c.n_layers * c.n_kv_heads * c.max_seq_len * c.head_dim * 4
        print(f"   {name:<22} {size / 2**20:>7.1f} MiB")

    # ---------------------------------------------------------------- 6. the speed-up
    # Without a cache, token t costs a forward over t tokens; with it, a forward over one token. Timed
    # on the "seed" model (5.8M parameters), greedy, after a 16-token prompt.
    seed_cfg = ft.PRESETS["seed"].replace(dropout=0.0)
    seed_params = ft.init_params(seed_cfg, seed=0)
    prompt = torch.randint(0, seed_cfg.vocab_size, (1, 16), generator=gen)

    def no_cache(n: int) -> torch.Tensor:
        seq = prompt
        for _ in range(n):
            seq = torch.cat([seq, ft.forward(seed_params, seq, seed_cfg)[:, -1].argmax(-1, keepdim=True)], dim=-1)
        return seq

    def with_cache(n: int) -> torch.Tensor:
        return ft.generate(seed_params, prompt, seed_cfg, max_new_tokens=n, sampling=ft.Sampling(temperature=0))

    def tokens_per_second(fn, n: int) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = fn(n)
        return n / (time.perf_counter() - start), out

    with_cache(4), no_cache(4)  # warm-up
    print()
    print("6. greedy generation on the seed model: tokens/s")
    print(f"   {'new tokens':>10} {'with cache':>11} {'recomputing':>12} {'speed-up':>9}  same tokens")
    for n in (args.new_tokens // 4, args.new_tokens):
        fast, a = tokens_per_second(with_cache, n)
        slow, b = tokens_per_second(no_cache, n)
        print(f"   {n:>10} {fast:>11,.0f} {slow:>12,.0f} {fast / slow:>8.1f}x  {torch.equal(a, b)}")
    # What to look at: the speed-up grows with the length -- recomputing is quadratic in it, the cache
    # linear. (`ftransformer bench generate` times this properly, against Hugging Face too.)

    # ---------------------------------------------------------------- 7. sampling
    # Greedy takes the argmax; sampling draws from softmax(logits / temperature), optionally only among
    # the top-k tokens or the smallest set holding top_p of the probability. The randomness comes from
    # an explicit seed, so a seed reproduces a text exactly.
    prompt = torch.randint(0, cfg.vocab_size, (1, 4), generator=gen)
    print()
    print("7. sampling (new tokens only)")
    warm = ft.Sampling(temperature=1.0)
    for label, kw in (("greedy", dict(sampling=ft.Sampling(temperature=0))), ("T=1.0 seed 1", dict(sampling=warm, seed=1)),
                      ("T=1.0 seed 1", dict(sampling=warm, seed=1)), ("T=1.0 seed 2", dict(sampling=warm, seed=2)),
                      ("T=0.7 top-k 5", dict(sampling=ft.Sampling(temperature=0.7, top_k=5), seed=1)),
                      ("T=1.0 top-p 0.5", dict(sampling=ft.Sampling(temperature=1.0, top_p=0.5), seed=1))):
        new = ft.generate(params, prompt, cfg, max_new_tokens=8, **kw)[0, 4:]
        print(f"   {label:<16} {new.tolist()}")


if __name__ == "__main__":
    main()
