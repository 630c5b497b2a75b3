"""`condnoise sample --pipeline`: tiny randomly initialised diffusers LDMTextToImagePipeline
and DiTPipeline folders, saved and loaded offline, sampled with condnoise's sweeps; the
wrapped models compute what the pipelines' own denoising step computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from condnoise.app.cli import main
from condnoise.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ldm_folder(tmp_path_factory):
    from diffusers import DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel, VQModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
        LDMBertConfig,
        LDMBertModel,
    )
    from transformers import BertTokenizer

    from condnoise.conditioning.text import minilm_folder

    torch.manual_seed(0)
    vq = VQModel(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3, norm_num_groups=8,
                 num_vq_embeddings=32, vq_embed_dim=3)  # fmt: skip
    bert = LDMBertModel(LDMBertConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, head_dim=16,
                                      encoder_ffn_dim=64, max_position_embeddings=77))  # fmt: skip
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2)  # fmt: skip
    tok = BertTokenizer(vocab_file=str(minilm_folder() / "vocab.txt"))
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    folder = tmp_path_factory.mktemp("ldm")
    LDMTextToImagePipeline(vqvae=vq, bert=bert, tokenizer=tok, unet=unet, scheduler=sched).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)  # fmt: skip
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)  # fmt: skip
    for p in dit.parameters():  # leave adaLN-Zero's zero init: the condition must matter
        torch.nn.init.normal_(p, std=0.05)
    folder = tmp_path_factory.mktemp("dit")
    DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler()).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())  # as in facebook/DiT-XL-2-256
    (folder / "model_index.json").write_text(json.dumps({**index, "id2label": {"0": "zero", "1": "one, uno"}}))
    return folder


def test_ldm_text_pipeline_step_matches_the_pipeline(ldm_folder):
    from diffusers import DiffusionPipeline

    from condnoise.diffusion.samplers import guided_eps
    from condnoise.training.pipelines import load_pipeline

    run = load_pipeline(ldm_folder)
    pipe = DiffusionPipeline.from_pretrained(str(ldm_folder))
    assert run.latent_shape == (3, 8, 8) and run.image_shape == (3, 16, 16)
    assert run.schedule.kind == "scaled-linear" and len(run.schedule.betas) == 1000
    prompts = ["a red bag on the left", "two blue sneakers at the top"]
    ids = run.model.encoder.tokenize(prompts)
    ref_ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids  # fmt: skip
    assert torch.equal(ids, ref_ids)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([500, 500])
    with torch.no_grad():
        ours = guided_eps(run.model, x, t, ids, guidance=4.0)
        uncond = pipe.bert(pipe.tokenizer([""] * 2, padding="max_length", max_length=77,
                                          return_tensors="pt").input_ids)[0]  # fmt: skip
        ctx = torch.cat([uncond, pipe.bert(ref_ids)[0]])
        out = pipe.unet(torch.cat([x, x]), 500, encoder_hidden_states=ctx).sample
        e_u, e_c = out.chunk(2)  # the pipeline's order: [uncond, text]
    torch.testing.assert_close(ours, e_u + 4.0 * (e_c - e_u), atol=1e-5, rtol=1e-4)
    assert run.model.is_null(run.model.null_like(ids)).all() and not run.model.is_null(ids).any()


def test_sample_cli_on_pipelines(ldm_folder, dit_folder, tmp_path):
    out = tmp_path / "ldm"
    assert main(["sample", "--pipeline", str(ldm_folder), "--prompt", "a red bag", "--prompt",
                 "a blue coat at the top", "--guidance", "1,3", "--num", "4", "--steps", "3",
                 "--out", str(out), "--batch-size", "3"]) == 0  # fmt: skip
    with np.load(out / "s3" / "samples.npz") as z:
        assert z["images"].shape == (4, 16, 16, 3)
        assert list(z["captions"]) == ["a red bag", "a blue coat at the top"] * 2
        assert z["source_indices"].tolist() == [-1] * 4
    meta = json.loads((out / "s3" / "meta.json").read_text())
    assert meta["prompts"] == {"source": "prompt", "count": 2, "paired": False}
    with np.load(out / "s1" / "samples.npz") as a, np.load(out / "s3" / "samples.npz") as b:
        assert not np.array_equal(a["images"], b["images"])  # guidance matters
    out = tmp_path / "dit"
    assert main(["sample", "--pipeline", str(dit_folder), "--classes", "one,zero", "--guidance", "2",
                 "--num", "4", "--steps", "2", "--out", str(out), "--sampler", "ddim"]) == 0  # fmt: skip
    with np.load(out / "s2" / "samples.npz") as z:
        assert z["images"].shape == (4, 16, 16, 3) and z["labels"].tolist() == [1, 0, 1, 0]
    assert json.loads((out / "s2" / "meta.json").read_text())["class_names"][:2] == ["zero", "one"]


def test_dit_pipeline_model_matches_the_transformer(dit_folder):
    from diffusers import DiffusionPipeline

    from condnoise.diffusion.samplers import guided_eps
    from condnoise.training.pipelines import load_pipeline

    run = load_pipeline(dit_folder)
    pipe = DiffusionPipeline.from_pretrained(str(dit_folder))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.tensor([3, 7])
    with torch.no_grad():
        ours = guided_eps(run.model, x, t, y, guidance=2.0)
        out = pipe.transformer(torch.cat([x, x]), timestep=torch.cat([t, t]),
                               class_labels=torch.tensor([3, 7, 10, 10])).sample[:, :4]  # fmt: skip
    e_c, e_u = out.chunk(2)
    torch.testing.assert_close(ours, e_u + 2.0 * (e_c - e_u), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(e_c, e_u)


def test_pipeline_bad_input(tmp_path, dit_folder, capsys):
    from condnoise.training.pipelines import load_pipeline

    with pytest.raises(UserError, match="model_index.json"):
        load_pipeline(tmp_path)
    assert main(["sample", "--pipeline", str(dit_folder), "--prompt", "a bag", "--num", "2",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "class-conditional" in capsys.readouterr().err
    assert main(["sample", "--num", "2", "--out", str(tmp_path / "y")]) == 2
    assert "RUN_DIR or --pipeline" in capsys.readouterr().err
