"""Video VAE: shapes, exact crop/pad round trip, temporal causality, loss, speed, learning."""

from __future__ import annotations


import pytest
import torch

from models.vae import VAE_models, VAEConfig, VideoVAE, vae_loss


def _clip(B=1, T=8, H=210, W=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, 3, H, W, generator=g) * 2 - 1


@pytest.mark.parametrize("f", [1, 2, 4])
@pytest.mark.parametrize("s", [2, 4, 8])
def test_tiny_shapes_and_exact_round_trip_on_atari_frames(f, s):
    vae = VAE_models["tiny"](temporal_downsample=f, spatial_downsample=s).eval()
    x = _clip(B=1, T=7)  # 7 frames: not a multiple of 2 or 4
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        out = vae.decode(mean, 7, (210, 160))
    Hs = -(-210 // s)
    assert mean.shape == logvar.shape == (1, vae.latent_frames(7), 4, Hs, 160 // s)
    assert vae.latent_frames(7) == -(-7 // f) and vae.frames_per_latent == f
    assert out.shape == x.shape


def test_x2_latent_grid_settings_and_bad_stem():
    from workers.train_vae import TrainVAEConfig, build_vae

    vae = build_vae(TrainVAEConfig(vae_preset="small", latent_channels=8, spatial_downsample=2, temporal_kernel=1))
    assert (vae.cfg.spatial_downsample, vae.cfg.stem_patch, vae.cfg.num_downsamples) == (2, 2, 0)
    assert vae.latent_hw((210, 160)) == (105, 80)
    assert build_vae(TrainVAEConfig(spatial_downsample=2)).cfg.stem_patch == 2  # tiny's stem capped
    assert build_vae(TrainVAEConfig(spatial_downsample=2, stem_patch=1)).cfg.num_downsamples == 1
    with pytest.raises(ValueError, match="stem_patch=4.*divide spatial_downsample"):
        build_vae(TrainVAEConfig(spatial_downsample=2, stem_patch=4))
    with pytest.raises(ValueError, match="spatial_downsample=3; expected 2, 4 or 8"):
        VAEConfig(spatial_downsample=3)


@pytest.mark.parametrize("name", ["small", "base"])
def test_larger_presets_shapes(name):
    vae = VAE_models[name](temporal_downsample=2).eval()
    x = _clip(T=3, H=22, W=17)
    with torch.no_grad():
        recon, mean, _ = vae(x, sample_posterior=False)
    assert mean.shape == (1, 2, 4, 6, 5) and recon.shape == x.shape


@pytest.mark.parametrize("f", [1, 2, 4])
def test_encoder_and_decoder_are_causal_in_time(f):
    torch.manual_seed(0)
    vae = VAE_models["tiny"](temporal_downsample=f).eval()
    x = _clip(T=8, H=32, W=24)
    x2 = x.clone()
    x2[:, 4:] = _clip(T=4, H=32, W=24, seed=1)  # change frames 4.. only
    with torch.no_grad():
        m1, _ = vae.encode(x)
        m2, _ = vae.encode(x2)
        keep = 4 // f  # latents of groups that end before frame 4
        torch.testing.assert_close(m1[:, :keep], m2[:, :keep], rtol=0, atol=1e-6)
        assert (m1[:, keep:] - m2[:, keep:]).abs().amax() > 1e-4  # later latents do see the change
        z2 = m1.clone()
        z2[:, keep:] += 1.0
        d1, d2 = vae.decode(m1, 8, (32, 24)), vae.decode(z2, 8, (32, 24))
        torch.testing.assert_close(d1[:, :4], d2[:, :4], rtol=0, atol=1e-6)
        assert (d1[:, 4:] - d2[:, 4:]).abs().amax() > 1e-4


def test_latent_frame_mask_groups_frames():
    vae = VAE_models["tiny"](temporal_downsample=4)
    mask = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    assert vae.latent_frame_mask(mask).tolist() == [[False, True], [False, True]]  # padding counts as generated
    vae1 = VAE_models["tiny"](temporal_downsample=1)
    assert torch.equal(vae1.latent_frame_mask(mask), mask)


def test_decode_rejects_inconsistent_sizes():
    vae = VAE_models["tiny"](temporal_downsample=2)
    z = torch.zeros(1, 3, 4, 53, 40)
    with pytest.raises(ValueError, match="num_frames"):
        vae.decode(z, 7, (210, 160))  # 7 frames need 4 latents
    with pytest.raises(ValueError, match="out_hw"):
        vae.decode(z, 6, (220, 160))
    with pytest.raises(ValueError, match="temporal_downsample"):
        VAEConfig(temporal_downsample=3)
    with pytest.raises(ValueError, match="encode expects"):
        vae.encode(torch.zeros(1, 2, 1, 8, 8))


def test_vae_loss_parts_and_perceptual_callable():
    x = _clip(T=2, H=8, W=8)
    recon = x + 0.1
    zeros = torch.zeros(1, 2, 4, 2, 2)
    total, parts = vae_loss(x, recon, zeros, zeros, kl_weight=1.0)
    torch.testing.assert_close(parts["recon"], torch.tensor(0.1))
    assert parts["kl"] == 0 and torch.equal(total, parts["recon"] + 0)
    _, parts2 = vae_loss(x, recon, zeros + 1, zeros, kl_weight=0.5, recon_kind="l2")
    torch.testing.assert_close(parts2["kl"], torch.tensor(0.5))  # 0.5 * mean^2
    torch.testing.assert_close(parts2["total"], parts2["recon"] + 0.25)
    seen = []

    def percept(a, b):
        seen.append(a.shape)
        return (a - b).abs().mean(dim=(1, 2, 3))

    total3, parts3 = vae_loss(x, recon, zeros, zeros, 0.0, perceptual=percept, perceptual_weight=2.0)
    assert seen == [(2, 3, 8, 8)]  # frames of the clip, one image each
    torch.testing.assert_close(total3, parts3["recon"] + 2.0 * parts3["perceptual"])


def test_tiny_vae_learns_to_reconstruct():
    torch.manual_seed(0)
    vae = VAE_models["tiny"](temporal_downsample=2)
    # A smooth moving blob: structure a VAE can compress, unlike white noise.
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    frames = [torch.exp(-((yy - 0.1 * k) ** 2 + xx**2) * 8) for k in range(4)]
    x = (torch.stack(frames)[None, :, None].expand(1, 4, 3, 16, 16) * 2 - 1).contiguous()
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        recon, mean, logvar = vae(x)
        loss, parts = vae_loss(x, recon, mean, logvar, kl_weight=1e-4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["recon"].item())
    assert losses[-1] < 0.5 * losses[0]
