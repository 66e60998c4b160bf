"""The counter-based dropout mask: torch's Philox equals Triton's `tl.randint4x` word for word, the
kernels' tiles (four elements per Philox call) equal the torch mask at any tile position, the keep
rate is 1 - p, and the seed path needs no host int: LoRA training forwards compile with
fullgraph=True (no graph break) and give the eager result for the same draws."""

import pytest
import torch
import triton
import triton.language as tl

from packtune.kernels.dropout import draw_seed, keep_threshold, keep_tile, philox, philox_keep

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter without a GPU


@triton.jit
def _words_kernel(OUT, SEED, base, BLOCK: tl.constexpr):
    r0, r1, r2, r3 = tl.randint4x(tl.load(SEED), base + tl.arange(0, BLOCK).to(tl.int64))
    offsets = tl.arange(0, BLOCK) * 4
    tl.store(OUT + offsets, r0.to(tl.int64))
    tl.store(OUT + offsets + 1, r1.to(tl.int64))
    tl.store(OUT + offsets + 2, r2.to(tl.int64))
    tl.store(OUT + offsets + 3, r3.to(tl.int64))


@triton.jit
def _mask_kernel(OUT, SEED, n_rows, n_cols, threshold, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col0 = tl.program_id(1) * BLOCK_C
    cols = col0 + tl.arange(0, BLOCK_C)
    keep = keep_tile(tl.load(SEED), rows, col0, n_cols, threshold, BLOCK_N, BLOCK_C)
    tl.store(OUT + rows[:, None] * n_cols + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@pytest.mark.parametrize("seed", [0, 5, 2**40 + 7, 2**62 - 1])
def test_torch_philox_is_tritons_randint4x(seed):
    """Counters past 2^32 too (their high word is Philox's second counter word)."""
    seed = torch.tensor(seed, device=DEVICE)
    for base in (0, 2**33 + 5):
        words = torch.zeros(64, dtype=torch.int64, device=DEVICE)
        _words_kernel[(1,)](words, seed, base, BLOCK=16)
        expected = torch.stack(philox(seed, torch.arange(16, device=DEVICE) + base), dim=-1).flatten()
        assert torch.equal(words, expected)


@pytest.mark.parametrize(("n_rows", "n_cols", "blocks"),
                         [(37, 70, (16, 32)), (5, 3, (16, 16)), (40, 64, (8, 64))])
def test_kernel_tiles_draw_the_torch_mask(n_rows, n_cols, blocks):
    """Partial tiles, widths not a multiple of 4 or of the tile: the same mask from any tiling."""
    seed = torch.tensor(2**41 + 3, device=DEVICE)
    got = torch.zeros(n_rows, n_cols, dtype=torch.int8, device=DEVICE)
    grid = (triton.cdiv(n_rows, blocks[0]), triton.cdiv(n_cols, blocks[1]))
    _mask_kernel[grid](got, seed, n_rows, n_cols, keep_threshold(0.3), BLOCK_N=blocks[0], BLOCK_C=blocks[1])
    assert torch.equal(got.bool(), philox_keep((n_rows, n_cols), 0.3, seed))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_seeds(p):
    keep = philox_keep((256, 512), p, torch.tensor(11))
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    assert not torch.equal(keep, philox_keep((256, 512), p, torch.tensor(12)))
    assert torch.equal(philox_keep((2, 128, 512), p, torch.tensor(11)).view(256, 512), keep)


def test_seeds_are_device_tensors_drawn_from_the_generator():
    torch.manual_seed(3)
    first = draw_seed("cpu", 3)
    torch.manual_seed(3)
    assert torch.equal(draw_seed("cpu", 3), first) and first.dtype == torch.int64 and first.shape == (3,)
    assert draw_seed("cpu").shape == () and len(set(first.tolist())) == 3


@pytest.mark.parametrize("mlp", [False, True])
def test_lora_training_forward_compiles_without_a_graph_break(mlp):
    """Dropout seeds drawn inside the compiled region (no int(): fullgraph=True would fail on a
    graph break), and the compiled step equals eager for the same generator state."""
    from packtune.lora.modules import LoRALinear, LoRAMLP

    def linear(n_in, n_out):
        layer = LoRALinear(torch.nn.Linear(n_in, n_out, bias=False), rank=4, scale=2.0, dropout=0.25)
        torch.nn.init.normal_(layer.lora_B)
        return layer

    torch.manual_seed(0)
    module = LoRAMLP(linear(16, 24), linear(16, 24), linear(24, 16)) if mlp else linear(16, 24)
    x = torch.randn(10, 16)

    def run(fn):
        torch.manual_seed(7)
        out = fn(x)
        out.square().sum().backward()
        grads = [p.grad.clone() for p in module.parameters() if p.requires_grad]
        module.zero_grad(set_to_none=True)
        return out.detach(), grads

    torch._dynamo.reset()
    compiled = run(torch.compile(module, fullgraph=True, backend="aot_eager"))
    eager = run(module)
    torch.testing.assert_close(compiled[0], eager[0])
    for got, want in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(got, want)
    torch.manual_seed(8)
    assert not torch.equal(module(x), eager[0]), "another draw, another mask"
