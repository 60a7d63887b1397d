"""ST-DiT, action encoder and Open-Sora loader: shapes, conditioning semantics, compile, bf16."""

from __future__ import annotations

import pytest
import torch

from models.action_encoder import ActionEncoder, ActionEncoderConfig, action_positions, drop_actions
from models.opensora import load_opensora_stdit3
from models.stdit import STDiT, STDiT_models, STDiTConfig


def _inputs(B=2, T=5, C=4, H=13, W=10, A=4, n_cond=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, H, W, generator=g)
    t = torch.rand(B, generator=g)
    actions = torch.randint(0, 18, (B, A), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, n_cond:] = True
    return x, t, actions, mask


def _perturbed(model: torch.nn.Module, seed=0, std=0.05) -> torch.nn.Module:
    """Move every weight away from its (partly zero) init so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="module")
def tiny() -> STDiT:
    torch.manual_seed(0)
    return _perturbed(STDiT_models["tiny"]())


@pytest.mark.parametrize("name", ["tiny", "S"])
def test_presets_forward_shapes_on_cpu(name):
    model = STDiT_models[name]().eval()
    x, t, a, m = _inputs(H=53, W=40) if name == "tiny" else _inputs(T=3, H=7, W=6, n_cond=1)
    with torch.no_grad():
        out = model(x, t, actions=a, frame_mask=m)
    assert out.shape == x.shape  # odd H (53, 13, 7) is padded to the patch and cropped back


@pytest.mark.parametrize("name", ["B", "L", "XL/2"])
def test_large_presets_build_and_run_on_meta(name):
    with torch.device("meta"):
        model = STDiT_models[name]()
        x, t, a, m = (v.to("meta") for v in _inputs(T=4, H=8, W=8))
        out = model(x, t, actions=a, frame_mask=m)
    assert out.shape == x.shape
    n = sum(p.numel() for p in model.parameters())
    assert n > 1e8


def test_xl2_matches_open_sora_stdit3_xl2_shape():
    with torch.device("meta"):
        model = STDiT_models["XL/2"]()
    cfg = model.cfg
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.mlp_ratio) == (1152, 28, 16, 4.0)
    assert tuple(cfg.patch_size) == (1, 2, 2) and cfg.in_channels == 4
    n = sum(p.numel() for p in model.parameters())
    assert 1.1e9 < n < 1.25e9  # STDiT3-XL/2 without its text embedder: 16 D^2 per block x 56 blocks


def test_patch_padding_in_time_and_space():
    model = _perturbed(STDiT(STDiTConfig(hidden_size=32, depth=1, num_heads=2, patch_size=(2, 2, 2))))
    x, t, a, m = _inputs(T=5, H=9, W=7)
    with torch.no_grad():
        out = model(x, t, actions=a, frame_mask=m)
    assert out.shape == x.shape


def test_temporal_blocks_start_as_identity():
    model = STDiT_models["tiny"]()
    x = torch.randn(2, 5, 7, model.cfg.hidden_size)
    mod = torch.randn(2, 5, 6, model.cfg.hidden_size)
    cond = torch.randn(2, 3, model.cfg.hidden_size)
    with torch.no_grad():
        assert torch.equal(model.temporal_blocks[0](x, mod, cond), x)
        assert not torch.allclose(model.spatial_blocks[0](x, mod, cond), x)


def test_output_depends_on_actions(tiny):
    x, t, a, m = _inputs()
    other = (a + 1) % 18
    with torch.no_grad():
        y1 = tiny(x, t, actions=a, frame_mask=m)
        y2 = tiny(x, t, actions=other, frame_mask=m)
        y_null = tiny(x, t, actions=drop_actions(a, torch.tensor([True, False])), frame_mask=m)
    assert (y1 - y2).abs().amax() > 1e-4
    assert (y_null[0] - y1[0]).abs().amax() > 1e-4  # dropped sample changes
    torch.testing.assert_close(y_null[1], y1[1])  # kept sample does not


def test_output_depends_on_action_positions(tiny):
    x, t, a, m = _inputs(A=4, n_cond=3)
    with torch.no_grad():
        y_future = tiny(x, t, actions=a, frame_mask=m, action_positions=action_positions(4, 3, "future"))
        y_zero = tiny(x, t, actions=a, frame_mask=m, action_positions=action_positions(4, 3, "past_future"))
    assert (y_future - y_zero).abs().amax() > 1e-5


def test_condition_frames_use_timestep_zero(tiny):
    x, _, a, m = _inputs()
    t1, t2 = torch.full((2,), 0.2), torch.full((2,), 0.9)
    with torch.no_grad():
        y1 = tiny(x, t1, actions=a, frame_mask=m)
        y2 = tiny(x, t2, actions=a, frame_mask=m)
        all_cond = torch.zeros_like(m)
        c1 = tiny(x, t1, actions=a, frame_mask=all_cond)
        c2 = tiny(x, t2, actions=a, frame_mask=all_cond)
        c0 = tiny(x, torch.zeros(2), actions=a, frame_mask=torch.ones_like(m))
    assert (y1[:, 3:] - y2[:, 3:]).abs().amax() > 1e-4  # generated frames see t
    assert torch.equal(c1, c2)  # no generated frame: t is never read
    torch.testing.assert_close(c1, c0)  # condition frames == frames generated at t=0


def test_action_encoder_kinds_and_null_token():
    for kind in ("embedding", "onehot"):
        enc = ActionEncoder(ActionEncoderConfig(num_actions=4, kind=kind, hidden_size=16, embed_dim=8))
        a = torch.tensor([[0, 3, -1]])
        tok = enc(a)
        assert tok.shape == (1, 3, 16)
        same_pos = enc(torch.tensor([[0, 0, 0]]), positions=torch.zeros(3, dtype=torch.long))
        torch.testing.assert_close(same_pos[0, 0], same_pos[0, 2])  # position is the only difference
        null = enc(torch.tensor([[-1]]))
        real = enc(torch.tensor([[k] for k in range(4)]))
        assert (real - null).abs().amax(dim=-1).min() > 0  # null differs from every action
    with pytest.raises(ValueError, match="kind"):
        ActionEncoderConfig(kind="bag")


def test_action_positions_modes():
    assert action_positions(2, 4, "future").tolist() == [3, 4]
    assert action_positions(5, 4, "past_future").tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="action mode"):
        action_positions(2, 4, "past")


def test_compile_fullgraph_no_graph_breaks(tiny):
    # backend="eager" traces with Dynamo and fails on any graph break, without the minutes that
    # inductor's C++ codegen takes on a 2-core CPU; the GPU path uses the same traced graph.
    torch._dynamo.reset()
    compiled = torch.compile(tiny, fullgraph=True, backend="eager")
    x, t, a, m = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, actions=a, frame_mask=m), tiny(x, t, actions=a, frame_mask=m))


def test_bf16_autocast_forward_on_cpu(tiny):
    x, t, a, m = _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(x, t, actions=a, frame_mask=m)
    ref = tiny(x, t, actions=a, frame_mask=m).detach()
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean() + 1e-3


def test_backward_reaches_every_parameter():
    model = _perturbed(STDiT_models["tiny"]()).train()
    x, t, a, m = _inputs()
    model(x, t, actions=a, frame_mask=m).square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []
    # Row by row: every action given gets a gradient; the null-action row (used only for -1, which
    # these actions never are) and the rows of actions not given get none.
    emb = model.action_embedder.embedding.weight.grad  # (num_actions + 1, E)
    given = torch.zeros(len(emb), dtype=torch.bool)
    given[a.unique()] = True
    assert (emb[given].abs().sum(dim=1) > 0).all()
    assert (emb[~given].abs().sum(dim=1) == 0).all() and not given[-1]


def test_residual_stream_stays_contiguous(tiny):
    """Every block and the final layer receive a contiguous (B, T, S, D) stream, so their LayerNorms
    and Linears (and the backward passes) read it without copying a transposed view first; the
    patch embedding's channels-first conv output is the one place that must be reordered."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((type(mod).__name__, args[0].is_contiguous())))
             for m in [*tiny.spatial_blocks, *tiny.temporal_blocks, tiny.final_layer]]
    try:
        x, t, a, m = _inputs()
        with torch.no_grad():
            tiny(x, t, actions=a, frame_mask=m)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 2 * tiny.cfg.depth + 1
    assert all(ok for _, ok in seen), seen


# ---- Open-Sora STDiT3 checkpoint mapping -------------------------------------------------------


def _stdit3_state_dict(D, depth, heads, in_ch=4, patch=(1, 2, 2), caption=32, tokens=5, mlp=4, device="cpu"):
    """A synthetic state dict with STDiT3's key names and shapes (pred_sigma=True, qk_norm=True)."""
    g = torch.Generator(device=device).manual_seed(1) if device != "meta" else None

    def r(*shape):
        return torch.empty(shape, device=device) if device == "meta" else torch.randn(shape, generator=g)

    P = patch[0] * patch[1] * patch[2]
    sd = {
        "x_embedder.proj.weight": r(D, in_ch, *patch), "x_embedder.proj.bias": r(D),
        "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
        "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
        "fps_embedder.mlp.0.weight": r(D, 256), "fps_embedder.mlp.0.bias": r(D),
        "fps_embedder.mlp.2.weight": r(D, D), "fps_embedder.mlp.2.bias": r(D),
        "t_block.1.weight": r(6 * D, D), "t_block.1.bias": r(6 * D),
        "y_embedder.y_embedding": r(tokens, caption),
        "y_embedder.y_proj.fc1.weight": r(D, caption), "y_embedder.y_proj.fc1.bias": r(D),
        "y_embedder.y_proj.fc2.weight": r(D, D), "y_embedder.y_proj.fc2.bias": r(D),
        "rope.freqs": r(D // heads // 2),
        "final_layer.linear.weight": r(P * 2 * in_ch, D), "final_layer.linear.bias": r(P * 2 * in_ch),
        "final_layer.scale_shift_table": r(2, D),
    }
    for kind in ("spatial_blocks", "temporal_blocks"):
        for i in range(depth):
            b = f"{kind}.{i}."
            sd.update({
                b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
                b + "attn.q_norm.weight": r(D // heads), b + "attn.k_norm.weight": r(D // heads),
                b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                b + "cross_attn.q_linear.weight": r(D, D), b + "cross_attn.q_linear.bias": r(D),
                b + "cross_attn.kv_linear.weight": r(2 * D, D), b + "cross_attn.kv_linear.bias": r(2 * D),
                b + "cross_attn.proj.weight": r(D, D), b + "cross_attn.proj.bias": r(D),
                b + "mlp.fc1.weight": r(mlp * D, D), b + "mlp.fc1.bias": r(mlp * D),
                b + "mlp.fc2.weight": r(D, mlp * D), b + "mlp.fc2.bias": r(D),
                b + "scale_shift_table": r(6, D),
            })
    return sd


def test_opensora_mapping_lands_weights_in_the_right_tensors():
    model = STDiT(STDiTConfig(hidden_size=32, depth=2, num_heads=2))
    sd = _stdit3_state_dict(D=32, depth=2, heads=2)
    t = torch.tensor([0.3])
    fps_only = STDiT(STDiTConfig(hidden_size=32, depth=2, num_heads=2))
    load_opensora_stdit3(fps_only, sd, fps=None)
    missing, unexpected = load_opensora_stdit3(model, sd, fps=24.0)
    assert missing == [] and unexpected == []
    own = model.state_dict()
    for key in ("spatial_blocks.1.attn.qkv.weight", "temporal_blocks.0.attn.q_norm.weight",
                "temporal_blocks.1.cross_attn.kv_linear.bias", "spatial_blocks.0.mlp.fc2.weight",
                "temporal_blocks.1.scale_shift_table", "x_embedder.proj.weight", "t_block.1.weight"):
        assert torch.equal(own[key], sd[key]), key
    # Velocity half (first 4 of each patch's 8 output channels), sign flipped.
    w = sd["final_layer.linear.weight"].view(4, 8, 32)[:, :4].reshape(16, 32)
    assert torch.equal(own["final_layer.linear.weight"], -w)
    # fps embedding folded into the timestep bias: t embedding shifts by a constant vector.
    with torch.no_grad():
        diff = model.t_embedder(t * 1000) - fps_only.t_embedder(t * 1000)
        diff2 = model.t_embedder(t * 0) - fps_only.t_embedder(t * 0)
    assert diff.abs().amax() > 0
    torch.testing.assert_close(diff, diff2)


def test_opensora_mapping_reports_and_rejects():
    model = STDiT(STDiTConfig(hidden_size=32, depth=1, num_heads=2))
    sd = _stdit3_state_dict(D=32, depth=2, heads=2)  # one block pair too many
    missing, unexpected = load_opensora_stdit3(model, sd)
    assert missing == [] and "spatial_blocks.1.attn.qkv.weight" in unexpected
    del sd["t_block.1.bias"]
    missing, _ = load_opensora_stdit3(model, sd)
    assert missing == ["t_block.1.bias"]
    with pytest.raises(ValueError, match="x_embedder.proj.weight"):
        load_opensora_stdit3(STDiT(STDiTConfig(hidden_size=32, depth=1, num_heads=2, in_channels=8)), sd)


def test_opensora_mapping_covers_xl2_on_meta():
    with torch.device("meta"):
        model = STDiT_models["XL/2"]()
    sd = _stdit3_state_dict(D=1152, depth=28, heads=16, caption=4096, tokens=300, device="meta")
    missing, unexpected = load_opensora_stdit3(model, sd)
    assert missing == [] and unexpected == []
    # Every parameter outside the action encoder has an STDiT3 counterpart of the same size.
    ours = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("action_embedder."))
    theirs = sum(v.numel() for k, v in sd.items() if not k.startswith(("y_embedder.", "fps_embedder.", "rope.")))
    sigma_half = (sd["final_layer.linear.weight"].numel() + sd["final_layer.linear.bias"].numel()) // 2
    assert ours == theirs - sigma_half
