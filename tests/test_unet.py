import torch

from ddpm.unet import LatentUNet, WindowAttention


def small_unet(**kw):
    torch.manual_seed(0)
    return LatentUNet(latent_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_levels=(0,), window=4, heads=2, global_depth=1, **kw)


def test_shapes_and_zero_initialised_output():
    m = small_unet()
    x = torch.randn(2, 4, 8, 8, 12)
    out = m(x, torch.tensor([1, 999]), torch.randn_like(x), torch.tensor([[5.0, 1.0], [3.0, 1.25]]))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # zero-init output layer


def test_window_attention_is_the_identity_at_init_and_windows_round_trip():
    wa = WindowAttention(8, 16, 2, 1, window=2)
    x = torch.randn(1, 8, 4, 6, 2)
    assert torch.equal(wa(x, torch.randn(1, 16)), x)  # adaLN-Zero gates start closed
    torch.nn.init.normal_(wa.blocks[0].ada.weight)
    # attention inside windows: changing one window leaves the others untouched
    y = wa(x, torch.ones(1, 16))
    x2 = x.clone()
    x2[..., :2, :2, :] += 1
    y2 = wa(x2, torch.ones(1, 16))
    assert torch.equal(y[..., 2:, :, :], y2[..., 2:, :, :]) and not torch.equal(y, y2)


def test_gradient_checkpointing_gives_the_same_gradients():
    m = small_unet()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, 4, 8, 8, 8)
    args = (x, torch.tensor([10]), torch.randn_like(x), torch.tensor([[5.0, 1.0]]))
    m(*args).square().sum().backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.grad_checkpoint = True
    m(*args).square().sum().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(g1, m.parameters()))


def test_spacing_changes_the_output():
    m = small_unet()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, 4, 8, 8, 8)
    a = m(x, torch.tensor([10]), x, torch.tensor([[5.0, 1.0]]))
    b = m(x, torch.tensor([10]), x, torch.tensor([[3.0, 1.0]]))
    assert not torch.allclose(a, b)
