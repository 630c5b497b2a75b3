"""Denoisers, the conditional model and its config (paper Sec. 4)."""

import pytest
import torch
import torch.nn.functional as F

from condnoise.diffusion.loss import diffusion_loss
from condnoise.diffusion.schedule import NoiseSchedule
from condnoise.errors import UserError
from condnoise.models import (
    DiffusersAutoencoder,
    IdentityAutoencoder,
    build_autoencoder,
    build_model,
    model_choices,
    resolve_model_config,
)
from condnoise.models.dit import DiTBlock, sincos_pos_embed_2d

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_DIT = {"family": "dit", "size": "T/4", "hidden": 64, "depth": 2, "heads": 2}
TINY_UNET = {"family": "unet", "size": "tiny", "channels": [16, 32]}




def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _dit_xl2_formula(h=1152, depth=28, p=2, c_in=4, c_out=8, classes=1000, freq=256) -> int:
    """Official DiT-XL/2 parameter count, layer by layer (Peebles & Xie 2023, Table 1)."""
    lin = lambda i, o: i * o + o  # noqa: E731
    block = lin(h, 3 * h) + lin(h, h) + lin(h, 4 * h) + lin(4 * h, h) + lin(h, 6 * h)
    embed = c_in * p * p * h + h + lin(freq, h) + lin(h, h) + (classes + 1) * h
    pos = (32 // p) ** 2 * h
    final = lin(h, 2 * h) + lin(h, p * p * c_out)
    return embed + pos + depth * block + final


def test_dit_xl2_parameter_count_on_meta_device():
    with torch.device("meta"):
        m = build_model({"family": "dit", "size": "XL/2", "learn_sigma": True}, in_channels=4, image_size=32, num_classes=1000)
    assert m.denoiser.pos_embed.device.type == "meta" or m.denoiser.pos_embed.numel() == 256 * 1152
    total = _count(m) + m.denoiser.pos_embed.numel()  # official DiT counts pos_embed as a parameter
    assert total == _dit_xl2_formula() == 675_129_632
    with torch.device("meta"):
        eps_only = build_model({"family": "dit", "size": "XL/2"}, in_channels=4, image_size=32, num_classes=1000)
    assert _count(m) - _count(eps_only) == 1152 * 4 * 4 + 16  # learn_sigma's extra outputs


def test_ldm_unet_preset_size_on_meta_device():
    with torch.device("meta"):
        m = build_model({"family": "unet", "size": "ldm"}, in_channels=3, image_size=64, num_classes=1000)
    assert 380e6 < _count(m) < 420e6  # paper Sec. 4: about 400M
    blocks = m.denoiser.net.down_blocks
    assert [type(b).__name__ for b in blocks] == ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3
    attn = blocks[1].attentions[0].transformer_blocks[0].attn2
    assert attn.heads == 1 and attn.to_k.in_features == 512  # 1 head, class context of 512


def test_sincos_position_embedding_layout():
    pe = sincos_pos_embed_2d(8, 3)  # grid 3x3, dim 8: [sin w, cos w, sin h, cos h] per 2 freqs
    assert pe.shape == (9, 8)
    pos = 5  # row 1, column 2
    w, h = 2.0, 1.0
    expect = torch.tensor([torch.sin(torch.tensor(w)), torch.sin(torch.tensor(w / 100)), torch.cos(torch.tensor(w)),
                           torch.cos(torch.tensor(w / 100)), torch.sin(torch.tensor(h)), torch.sin(torch.tensor(h / 100)),
                           torch.cos(torch.tensor(h)), torch.cos(torch.tensor(h / 100))])  # fmt: skip
    torch.testing.assert_close(pe[pos], expect)


def test_dit_shapes_adaln_zero_and_conditioning():
    torch.manual_seed(0)
    m = build_model({**TINY_DIT, "learn_sigma": True, "cond_dim": 48}, in_channels=3, image_size=16, num_classes=5)
    x, t, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 10.5, 500, 999]), torch.tensor([0, 1, 4, 5])
    m.eval()
    out = m(x, t, y)
    assert out.shape == (4, 6, 16, 16)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the network starts as the zero map
    blk = m.denoiser.blocks[0]
    h, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    torch.testing.assert_close(blk(h, c), h)  # ... and every block as the identity
    for p in m.denoiser.parameters():  # leave the zero init: the condition must now matter
        torch.nn.init.normal_(p, std=0.05)
    a, b = m(x, t, y), m(x, t, torch.tensor([1, 1, 4, 5]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:])
    with pytest.raises(UserError, match="labels"):
        m(x, t, y[:3])
    with pytest.raises(UserError, match="out of range"):
        m(x, t, torch.tensor([0, 1, 2, 6]))


def test_dit_block_compiles_without_graph_breaks():
    blk = DiTBlock(32, 2)
    explanation = torch._dynamo.explain(blk)(torch.randn(2, 4, 32), torch.randn(2, 32))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_dit_bf16_autocast_and_checkpointing_grads():
    torch.manual_seed(0)
    m = build_model(TINY_DIT, in_channels=1, image_size=16, num_classes=10)
    for p in m.denoiser.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(4, 1, 16, 16), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    m.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, t, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = m(x, t, y)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()

    def grads(blocks):
        m.denoiser.checkpoint_blocks = blocks
        m.zero_grad()
        m.train()
        m.cfg_dropout = 0.0
        m(x, t, y).square().mean().backward()
        return [p.grad.clone() for p in m.denoiser.parameters()]

    plain = grads(0)
    for k in (1, len(m.denoiser.blocks)):  # selective (first block) and every block
        for g1, g2 in zip(plain, grads(k), strict=True):
            torch.testing.assert_close(g1, g2)

    def saved_tensors(blocks):  # activations kept for backward: checkpointing must cut them
        m.denoiser.checkpoint_blocks = blocks
        count = 0

        def pack(t):
            nonlocal count
            count += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x, t, y).square().mean()
        return count

    depth = len(m.denoiser.blocks)
    assert saved_tensors(depth) < saved_tensors(1) < saved_tensors(0)


def _fmnist_batch(fmnist, n, size):
    imgs, labels = fmnist
    x0 = torch.from_numpy(imgs[:n].copy()).float().div(127.5).sub(1)[:, None]
    x0 = F.pad(x0, (2, 2, 2, 2), value=-1.0)  # 28 -> 32 with the background value
    if size != 32:
        x0 = F.avg_pool2d(x0, 32 // size)
    return x0, torch.from_numpy(labels[:n].copy())


@pytest.mark.parametrize(("cfg", "size", "steps"), [(TINY_DIT, 32, 60), (TINY_UNET, 16, 30)], ids=["dit", "unet"])
def test_overfits_a_few_fashion_mnist_images(fmnist, cfg, size, steps):
    torch.manual_seed(0)
    x0, y = _fmnist_batch(fmnist, 8, size)
    m = build_model({**cfg, "cfg_dropout": 0.0}, in_channels=1, image_size=size, num_classes=10)
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, 1000, (8,), generator=g), torch.randn(x0.shape, generator=g)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    m.train()
    losses = []
    for _ in range(steps):
        out = diffusion_loss(m, s, x0, y, t=t, noise=noise)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] / 10, losses[:: steps // 6]


def test_cfg_null_class_and_perturbation_only_in_training():
    torch.manual_seed(0)
    cfg = {**TINY_DIT, "perturbation": {"name": "cep-u", "gamma": 5.0}, "cfg_dropout": 0.5}
    m = build_model(cfg, in_channels=1, image_size=16, num_classes=10)
    y = torch.randint(0, 10, (4000,))
    m.train()
    c = m.embed(y).pooled
    is_null = torch.isclose(c, m.encoder.null_embedding()[None]).all(1)
    assert is_null.float().mean().item() == pytest.approx(0.5, abs=0.03)  # CFG dropout, unperturbed
    st = m.perturbation.stats()  # over the non-null rows, all of which are perturbed
    assert st["perturbed_fraction"] == 1.0
    assert st["mean_l2_shift"] == pytest.approx(5 / 3**0.5, rel=0.02)
    m.eval()
    assert torch.equal(m.embed(y).pooled, m.encoder.encode(y))  # sampling: no dropout, no CEP
    null = torch.full((3,), m.null_index)
    assert torch.equal(m.embed(null).pooled, m.encoder.null_embedding().expand(3, -1))
    assert m.null_index == 10 and m.num_classes == 10


def test_config_resolution_defaults_roundtrip_and_errors():
    cfg = resolve_model_config({"family": "dit", "size": "S/4", "perturbation": "cep-u"})
    assert cfg["hidden"] == 384 and cfg["cond_dim"] == 384 and cfg["cfg_dropout"] == 0.1
    assert cfg["perturbation"] == {"name": "cep-u", "gamma": 1.0, "ip": 0.0}
    assert resolve_model_config(cfg) == cfg
    u = resolve_model_config({"family": "unet", "size": "ldm", "perturbation": {"name": "ip"}})
    assert u["channels"] == [192, 384, 576, 960] and u["heads"] == 1 and u["cond_dim"] == 512
    assert u["embed_init_std"] == 1.0 and u["perturbation"] == {"name": "ip", "ip": 0.1}
    assert resolve_model_config(u) == u
    ch = model_choices()
    assert "XL/2" in ch["size"]["dit"] and "ldm" in ch["size"]["unet"] and "cep-fixed" in ch["perturbation"]
    bad = [
        ({"family": "vit"}, "family"),
        ({"family": "dit", "size": "XL/3"}, "size"),
        ({"family": "dit", "channels": [1]}, "channels"),
        ({"family": "dit", "depth": 0}, "depth"),
        ({"family": "dit", "cfg_dropout": 1.5}, "cfg_dropout"),
        ({"family": "dit", "perturbation": {"name": "cep-u", "gama": 1}}, "gama"),
        ({"family": "unet", "attention": [True]}, "attention"),
    ]
    for c, field in bad:
        with pytest.raises(UserError, match=field):
            build_model(c, in_channels=1, image_size=32, num_classes=10)
    with pytest.raises(UserError, match="patch"):
        build_model({"family": "dit", "size": "S/8"}, in_channels=1, image_size=28, num_classes=10)


def test_autoencoders():
    x = torch.randn(2, 1, 8, 8)
    ident = build_autoencoder(None)
    assert isinstance(ident, IdentityAutoencoder) and ident.decode(ident.encode(x)) is x
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    kl = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                       norm_num_groups=4, layers_per_block=1)  # fmt: skip
    ae = DiffusersAutoencoder(model=kl, scaling_factor=0.5)
    img = torch.randn(2, 3, 16, 16)
    z = ae.encode(img)
    assert z.shape == (2, *ae.latent_shape((3, 16, 16))) == (2, 4, 8, 8)
    torch.testing.assert_close(z, kl.encode(img).latent_dist.mean * 0.5)
    assert ae.decode(z).shape == img.shape
    with pytest.raises(UserError, match="nowhere"):
        build_autoencoder({"kind": "kl", "path": "/nowhere"})
    with pytest.raises(UserError, match="kind"):
        build_autoencoder({"kind": "vqgan"})


def test_typed_model_config_round_trips_and_names_bad_keys():
    from condnoise.models import FAMILIES, DiTConfig, ModelConfig, UNetConfig

    for family, cls in FAMILIES.items():
        cfg = ModelConfig.from_dict({"family": family})
        assert type(cfg) is cls and cfg.size_name == cls.DEFAULT_SIZE
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # to_dict round trip
    cfg = ModelConfig.from_dict({"family": "dit", "size": "T/4", "depth": 3, "perturbation": "cep-u",
                                 "autoencoder": {"kind": "kl", "path": "/x"},
                                 "latent_shape": [4, 8, 8]})  # fmt: skip
    assert isinstance(cfg, DiTConfig) and cfg.perturbation == {"name": "cep-u"}
    assert cfg.autoencoder.kind == "kl" and cfg.autoencoder.scaling_factor is None
    r = cfg.resolved()
    assert (r["hidden"], r["depth"], r["patch"], r["cond_dim"]) == (128, 3, 4, 128)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    u = ModelConfig.from_dict({"family": "unet", "size": "tiny", "checkpointing": 2})
    assert isinstance(u, UNetConfig) and u.resolved()["checkpointing"] is True
    bad = [
        ({"family": "dit", "channels": [8]}, "unknown key 'model.channels'; valid keys in model "
                                             "(family dit): family, size"),
        ({"family": "unet", "hidden": 8}, "valid keys in model (family unet)"),
        ({"family": "dit", "depth": "six"}, "model.depth: expected int or null, got 'six'"),
        ({"family": "dit", "size": "M/4"}, "model.size: 'M/4' unknown for dit; choose one of T/2"),
        ({"family": "dit", "autoencoder": {"kind": "gan"}},
         "model.autoencoder.kind: invalid value 'gan'; valid options: identity, kl, vq"),
        ({"family": "dit", "latent_shape": [4, 8]}, "model.latent_shape must be [C, H, W]"),
        ({"family": "dit", "cfg_dropout": 1.0}, "model.cfg_dropout must be in [0, 1)"),
        ({"family": "gan"}, "'family': 'gan' unknown; choose one of dit, unet"),
    ]
    for raw, message in bad:
        with pytest.raises(UserError) as e:
            ModelConfig.from_dict(raw)
        assert message in str(e.value), str(e.value)
