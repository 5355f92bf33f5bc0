"""A DiT with 8-bit linears: each norm hands its output to the linears already quantised per token (the fused
path of the GPU, run here through Triton's interpreter), and the network stays close to its float32 self."""

import pytest
import torch

from turbo_repl.models.checkpoint import tiny_dit
from turbo_repl.models.linear import Linear8, configure_linears, convert_linears
from turbo_repl.models.registry import dit_arch


@pytest.mark.parametrize("fmt,bound", [("int8", 3e-2), ("fp8", 8e-2)])
def test_norms_feed_quantised_activations_to_8bit_linears(fmt, bound):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 8, 12, generator=g)
    t = torch.tensor([[700.0]])
    ctx = torch.randn(1, 32, 32, generator=g)
    net = tiny_dit(dit_arch("tiny-t2v"), seed=5)
    with torch.no_grad():
        ref = net(x, t, ctx)
        convert_linears(net, fmt)
        configure_linears(net, "triton")
        pairs = []
        hooks = [m.register_forward_pre_hook(lambda m, args: pairs.append(isinstance(args[0], tuple)))
                 for m in net.modules() if isinstance(m, Linear8)]
        out = net(x, t, ctx)
    for h in hooks:
        h.remove()
    # q, k, v of self-attention, q of cross-attention and ffn.0 take the norms' quantised output, and ffn.2 the
    # hidden activations quantised by ffn.0's epilogue: 6 of 10 per block (cross k/v read the text, the two o's
    # the attention outputs)
    assert sum(pairs) == 6 * len(net.blocks)
    err = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < bound, err
