"""The FFN computed over slices of tokens (to bound peak memory at 720p) is the same function."""

import torch

from turbo_repl.models import dit
from turbo_repl.models.checkpoint import tiny_dit
from turbo_repl.models.registry import dit_arch


def test_ffn_in_token_slices_equals_whole(monkeypatch):
    net = tiny_dit(dit_arch("tiny-t2v"), seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 8, 12, generator=g)
    t = torch.tensor([[900.0], [400.0]])
    ctx = torch.randn(2, 32, 32, generator=g)
    whole = net(x, t, ctx)
    calls = []
    block = net.blocks[0]
    monkeypatch.setattr(dit, "FFN_CHUNK_BYTES", block.ffn[0].out_features * 2 * 2 * 50)   # 50 tokens a slice (B 2)
    from turbo_repl.models import linear

    original = linear.feed_forward
    monkeypatch.setattr(linear, "feed_forward",
                        lambda ffn, h, *update: calls.append(h.shape[1]) or original(ffn, h, *update))
    sliced = net(x, t, ctx)
    tokens = 3 * (8 // 2) * (12 // 2)
    assert calls == [50, tokens - 50] * len(net.blocks)
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)
