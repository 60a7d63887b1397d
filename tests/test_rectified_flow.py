"""Rectified-flow maths: noising, masked loss, timestep draws, Euler sampler, guidance."""

import pytest
import torch

from models.rectified_flow import EulerSampler, EulerSamplerConfig, RectifiedFlow, RectifiedFlowConfig

B, T, C, H, W = 3, 5, 4, 6, 7


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, T, C, H, W, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 3:] = True  # 3 condition frames, 2 generated
    mask[2, 2] = True  # per-sample masks may differ
    return x0, mask, g


def test_noising_formula_and_clean_condition_frames():
    x0, mask, g = batch()
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t = RectifiedFlow.add_noise(x0, eps, t, mask)
    m = mask[:, :, None, None, None]
    expected = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps
    torch.testing.assert_close(x_t[m.expand_as(x0)], expected[m.expand_as(x0)])
    assert torch.equal(x_t[~mask], x0[~mask])
    assert torch.equal(x_t[0][mask[0]], x0[0][mask[0]])  # t = 0 is data
    assert torch.equal(x_t[2][mask[2]], eps[2][mask[2]])  # t = 1 is noise


def test_logit_normal_and_uniform_t():
    g = torch.Generator().manual_seed(0)
    t = RectifiedFlow(RectifiedFlowConfig(logit_mean=0.0, logit_std=1.0)).sample_t(20000, generator=g)
    assert ((t > 0) & (t < 1)).all()
    assert t.median().item() == pytest.approx(0.5, abs=0.02)
    # logit(t) is N(mean, std)
    t2 = RectifiedFlow(RectifiedFlowConfig(logit_mean=1.0, logit_std=0.5)).sample_t(20000, generator=g)
    z = torch.logit(t2)
    assert z.mean().item() == pytest.approx(1.0, abs=0.03) and z.std().item() == pytest.approx(0.5, abs=0.03)
    u = RectifiedFlow(RectifiedFlowConfig(t_sampling="uniform")).sample_t(20000, generator=g)
    assert u.mean().item() == pytest.approx(0.5, abs=0.02) and u.std().item() == pytest.approx(12**-0.5, abs=0.01)
    with pytest.raises(ValueError, match="t_sampling"):
        RectifiedFlow(RectifiedFlowConfig(t_sampling="cosine"))


def test_loss_value_and_ignores_condition_frames():
    rf = RectifiedFlow()
    x0, mask, g = batch()
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0.3, 0.6, 0.9])
    pred = torch.randn(x0.shape, generator=g)

    def model_with(out):
        return lambda x_t, t, *, frame_mask, **kw: out

    loss = rf.loss(model_with(pred), x0, mask, t=t, noise=eps)
    target = eps - x0
    expected = (pred - target)[mask].pow(2).mean()
    torch.testing.assert_close(loss, expected)

    # Anything on condition frames, even inf/nan, leaves the loss unchanged.
    wild = pred.clone()
    wild[~mask] = torch.randn_like(wild[~mask]) * 1e6
    wild[0, 0] = float("nan")
    assert torch.equal(rf.loss(model_with(wild), x0, mask, t=t, noise=eps), loss)

    # Gradient wrt the network's output is exactly zero on condition frames, nonzero elsewhere.
    out = pred.clone().requires_grad_(True)
    rf.loss(model_with(out), x0, mask, t=t, noise=eps).backward()
    assert (out.grad[~mask] == 0).all()
    assert (out.grad[mask] != 0).all()

    # Also when the output there is inf/nan: no NaN leaks into the gradient.
    out = wild.clone().requires_grad_(True)
    rf.loss(model_with(out), x0, mask, t=t, noise=eps).backward()
    assert (out.grad[~mask] == 0).all() and torch.isfinite(out.grad).all()


def test_loss_reads_no_device_value_on_the_host():
    """The loss runs on the meta device, which holds no values: no step of it (a `.any()` check,
    boolean indexing) needs one, so on a GPU it queues without waiting for the device."""
    rf = RectifiedFlow(RectifiedFlowConfig(action_dropout=0.1))
    x0 = torch.empty(B, 4, 2, 3, 3, device="meta")
    mask = torch.empty(B, 4, dtype=torch.bool, device="meta")
    actions = torch.empty(B, 2, dtype=torch.long, device="meta")
    loss = rf.loss(lambda x_t, t, *, frame_mask, actions: 2 * x_t, x0, mask, actions=actions)
    assert loss.shape == () and loss.device.type == "meta"


def test_loss_passes_noised_input_and_conditioning():
    rf = RectifiedFlow()
    x0, mask, g = batch()
    eps = torch.randn(x0.shape, generator=g)
    t = torch.full((B,), 0.5)
    actions = torch.randint(0, 4, (B, 2), generator=g)
    seen = {}

    def model(x_t, t_in, *, actions, frame_mask):
        seen.update(x_t=x_t, t=t_in, actions=actions, frame_mask=frame_mask)
        return torch.zeros_like(x_t)

    rf.loss(model, x0, mask, t=t, noise=eps, actions=actions)
    torch.testing.assert_close(seen["x_t"], RectifiedFlow.add_noise(x0, eps, t, mask))
    assert torch.equal(seen["actions"], actions) and torch.equal(seen["frame_mask"], mask)
    with pytest.raises(ValueError, match="no generated frame"):
        rf.loss(model, x0, torch.zeros_like(mask), actions=actions)


def test_action_dropout():
    g = torch.Generator().manual_seed(0)
    actions = torch.randint(0, 6, (4000, 3), generator=g)
    dropped = RectifiedFlow(RectifiedFlowConfig(action_dropout=0.25)).drop_actions(actions, g)
    null_rows = (dropped == -1).all(1)
    assert null_rows.float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.equal(dropped[~null_rows], actions[~null_rows])  # whole sequences, untouched otherwise
    assert torch.equal(RectifiedFlow().drop_actions(actions), actions)


def oracle(x0):
    """The exact velocity field of the straight path towards a known x0: v = (x_t - x0) / t."""

    def model(x_t, t, *, frame_mask, **kw):
        return (x_t - x0) / t.view(-1, 1, 1, 1, 1)

    return model


@pytest.mark.parametrize("num_steps,shift", [(1, 1.0), (4, 1.0), (7, 3.0)])
def test_euler_recovers_x0_on_straight_flow(num_steps, shift):
    x0, mask, g = batch()
    x_cond = torch.where(mask[:, :, None, None, None], torch.zeros_like(x0), x0)  # future unknown
    sampler = EulerSampler(EulerSamplerConfig(num_steps=num_steps, shift=shift))
    out = sampler.sample(oracle(x0), x_cond, mask, generator=g)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[~mask], x0[~mask])


def test_sampler_keeps_condition_frames_bit_identical():
    x0, mask, g = batch()
    calls = []

    def model(x_t, t, *, frame_mask, actions):
        calls.append(t.clone())
        # The model is handed clean condition frames at every step.
        assert torch.equal(x_t[~frame_mask], x0[~frame_mask])
        return torch.randn(x_t.shape, generator=g) * 100  # wild velocities everywhere

    out = EulerSampler(EulerSamplerConfig(num_steps=5)).sample(model, x0, mask, actions=torch.zeros(B, 2).long())
    assert torch.equal(out[~mask], x0[~mask])
    assert not torch.allclose(out[mask], x0[mask])
    assert [c[0].item() for c in calls] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


def test_timesteps_schedule():
    ts = EulerSampler(EulerSamplerConfig(num_steps=4, shift=3.0)).timesteps()
    assert ts[0].item() == 1.0 and ts[-1].item() == 0.0 and (ts.diff() < 0).all()
    assert ts[2].item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))  # shifted towards noise: 0.75
    uniform = EulerSampler(EulerSamplerConfig(num_steps=4)).timesteps()
    torch.testing.assert_close(uniform, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_classifier_free_guidance_batched():
    x0, mask, g = batch()
    actions = torch.randint(0, 4, (B, 2), generator=g)
    batch_sizes = []

    def model(x_t, t, *, frame_mask, actions):
        batch_sizes.append(x_t.shape[0])
        # Velocity depends on the actions: cond -> sum of actions + 1, null (-1, -1) -> -2 + 1.
        return torch.ones_like(x_t) * (actions.sum(1).float() + 1).view(-1, 1, 1, 1, 1)

    scale = 3.0
    out = EulerSampler(EulerSamplerConfig(num_steps=2, guidance_scale=scale)).sample(
        model, x0, mask, noise=torch.zeros_like(x0), actions=actions
    )
    assert batch_sizes == [2 * B, 2 * B]  # one batched forward per step
    v_c = actions.sum(1).float() + 1
    v_u = torch.full((B,), -1.0)
    v = v_u + scale * (v_c - v_u)  # constant in time, so x(0) = noise - v
    expected = torch.where(mask[:, :, None, None, None], -v.view(-1, 1, 1, 1, 1).expand_as(x0), x0)
    torch.testing.assert_close(out, expected)
