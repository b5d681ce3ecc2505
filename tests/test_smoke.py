import torch
import ftransformer as ft


def test_forward_all_variants():
    cfg = ft.PRESETS["tiny"]
    t = torch.randint(0, 37, (2, 5, 7))
    for pos in ["learned", "sinusoidal", "rope"]:
        for a in ["sdpa", "einsum"]:
            c = cfg.replace(positional=pos, attn_impl=a, n_kv_heads=1, norm_position="post", activation="swiglu", norm="rmsnorm", dropout=0.1)
            p = ft.init_params(c)
            assert ft.forward(p, t, c).shape == (2, 5, 7, 37)
            assert ft.forward(p, t[0, 0], c, key=ft.random.key(0)).shape == (7, 37)
            ft.loss_fn(p, t, t, c, key=ft.random.key(0))
