"""``condnoise.cep.attach``: CEP on the conditions of a diffusers U-Net, gated by an explicit
flag (not ``module.training``), respecting the attention mask, on text and class U-Nets, and
the README's diffusers + accelerate text-to-image training loop run for a few steps."""

from __future__ import annotations

import math

import pytest
import torch

from condnoise import cep
from condnoise.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(**kw):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    args = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                norm_num_groups=8, cross_attention_dim=64, attention_head_dim=2)  # fmt: skip
    return UNet2DConditionModel(**{**args, **kw})


class Spy(torch.nn.Module):
    """Records the encoder_hidden_states a wrapped U-Net's first cross-attention receives."""

    def __init__(self, unet):
        super().__init__()
        self.seen = []
        attn = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
        attn.register_forward_pre_hook(lambda m, a, k: self.seen.append(k["encoder_hidden_states"].clone()),
                                       with_kwargs=True)  # fmt: skip


def test_attach_perturbs_real_tokens_with_the_cep_scale_until_removed():
    unet = _unet()
    spy = Spy(unet)
    x, t = torch.randn(64, 3, 8, 8), torch.full((64,), 10)
    states = torch.randn(64, 7, 64)
    mask = torch.ones(64, 7, dtype=torch.long)
    mask[:, 5:] = 0  # two padding positions
    unet.eval()  # an explicit flag, not module.training: eval mode is perturbed while enabled
    handle = cep.attach(unet, gamma=2.0, noise="uniform")
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=states, encoder_attention_mask=mask)
    delta = spy.seen[-1] - states
    bound = 2.0 / math.sqrt(64)
    assert torch.equal(delta[:, 5:], torch.zeros_like(delta[:, 5:]))  # padding untouched
    assert delta[:, :5].abs().max() <= bound * (1 + 1e-5) and delta[:, :5].abs().max() > 0.99 * bound
    assert handle.stats()["mean_l2_shift"] == pytest.approx(2 / math.sqrt(3), rel=0.02)
    with handle.paused(), torch.no_grad():
        unet(x, t, states)  # positional encoder_hidden_states
    assert torch.equal(spy.seen[-1], states) and handle.enabled
    with torch.no_grad():
        unet(x, t, states)
    assert not torch.equal(spy.seen[-1], states)  # positional form perturbed too
    handle.enabled = False
    unet.train()  # training mode does not switch it back on
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=states)
    assert torch.equal(spy.seen[-1], states)
    handle.enabled = True
    handle.remove()
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=states)
    assert torch.equal(spy.seen[-1], states)


def test_attach_class_embedding_gaussian_and_context_manager():
    unet = _unet(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 num_class_embeds=10)  # fmt: skip
    x, t, y = torch.randn(256, 3, 8, 8), torch.full((256,), 10), torch.randint(0, 10, (256,))
    states = torch.zeros(256, 1, 64)
    with cep.attach(unet, gamma=1.0, noise="gaussian", generator=torch.Generator().manual_seed(0)) as h:
        assert h.target == "class"
        seen = []  # registered after the CEP hook: sees the perturbed class embedding
        spy = unet.class_embedding.register_forward_hook(lambda m, a, o: seen.append(o.clone()))
        with torch.no_grad():
            unet(x, t, states, class_labels=y)
    with torch.no_grad():
        unet(x, t, states, class_labels=y)  # removed on exit: clean again
        clean = unet.class_embedding(y)
    spy.remove()
    d = clean.shape[1]  # the time-embedding width
    delta = seen[0] - clean
    assert torch.equal(seen[1], clean)
    assert delta.std().item() == pytest.approx(1 / math.sqrt(d), rel=0.03)  # CEP-G: sigma = gamma/sqrt(D)
    assert h.stats()["mean_l2_shift"] == pytest.approx(1.0, rel=0.03)
    with pytest.raises(UserError, match="class embedding"):
        cep.attach(_unet(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2), target="class")
    with pytest.raises(UserError, match="noise"):
        cep.attach(unet, noise="laplace")


def test_diffusers_accelerate_training_loop(tmp_path):
    """The README's loop: a frozen text encoder, a diffusers U-Net, DDPMScheduler,
    accelerate, and one line of CEP."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from transformers import AutoModel, AutoTokenizer

    from condnoise.conditioning.text import minilm_folder
    from condnoise.data.scenes import Scenes

    data = Scenes("train", num_samples=32)
    images = data.tensors()[0][:, :, ::4, ::4].contiguous()  # 8x8 for speed
    captions = data.conditions()
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder()))
    text_encoder = AutoModel.from_pretrained(str(minilm_folder())).requires_grad_(False)
    unet = _unet(cross_attention_dim=384)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(list(zip(images, captions)), batch_size=8, shuffle=True)
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    handle = cep.attach(accelerator.unwrap_model(unet), gamma=1.0, noise="uniform")  # CEP-U
    losses = []
    for _epoch in range(2):
        for x0, caption in loader:
            tok = tokenizer(list(caption), padding="max_length", max_length=48, truncation=True,
                            return_tensors="pt")  # fmt: skip
            with torch.no_grad():
                states = text_encoder(**tok).last_hidden_state
            noise = torch.randn_like(x0)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],))
            pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=states,
                        encoder_attention_mask=tok.attention_mask).sample  # fmt: skip
            loss = torch.nn.functional.mse_loss(pred, noise)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert handle.stats()["mean_l2_shift"] == pytest.approx(1 / math.sqrt(3), rel=0.05)
    handle.remove()
