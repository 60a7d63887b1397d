"""Load an Open-Sora v1.2 STDiT3 checkpoint into `STDiT_models["XL/2"]`.

Our modules carry STDiT3's names, so the mapping is the identity on every shared tensor:

| Open-Sora key                                              | here                  |
| ---------------------------------------------------------- | --------------------- |
| `x_embedder.proj.*`                                        | same                  |
| `t_embedder.mlp.{0,2}.*`, `t_block.1.*`                    | same                  |
| `{spatial,temporal}_blocks.{i}.attn.{qkv,proj}.*`          | same                  |
| `{spatial,temporal}_blocks.{i}.attn.{q_norm,k_norm}.weight`| same                  |
| `{spatial,temporal}_blocks.{i}.cross_attn.{q_linear,kv_linear,proj}.*` | same      |
| `{spatial,temporal}_blocks.{i}.mlp.{fc1,fc2}.*`, `.scale_shift_table` | same       |
| `final_layer.linear.*`, `final_layer.scale_shift_table`    | same, adapted (below) |

Adaptations, each exact rather than approximate:
- `final_layer.linear`: STDiT3 predicts (velocity, sigma) with velocity = x0 - noise; we predict
  noise - x0 only. Keep the velocity half of the rows and negate it.
- `fps_embedder.*`: STDiT3 adds an fps embedding to the timestep embedding; for a fixed fps that
  is a constant vector, folded here into `t_embedder.mlp.2.bias`.
Skipped: `y_embedder.*` (text: replaced by the action encoder, which starts fresh), `rope.freqs`
and `pos_embed.*` (fixed functions, recomputed here).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange

from models.layers import timestep_embedding
from models.stdit import STDiT

SKIPPED_PREFIXES = ("y_embedder.", "rope.", "pos_embed.", "fps_embedder.")
NEW_PREFIXES = ("action_embedder.",)  # ours only: never counted as missing


def _fps_vector(sd: Mapping[str, torch.Tensor], fps: float, device: torch.device) -> torch.Tensor:
    """STDiT3's fps embedding of one fps value -> (D,)."""
    w0, b0 = sd["fps_embedder.mlp.0.weight"], sd["fps_embedder.mlp.0.bias"]
    w2, b2 = sd["fps_embedder.mlp.2.weight"], sd["fps_embedder.mlp.2.bias"]
    freq = timestep_embedding(torch.tensor([fps], device=device), w0.shape[1]).to(w0.dtype)  # (1, 256)
    return F.linear(F.silu(F.linear(freq, w0, b0)), w2, b2)[0]  # (D,)


def load_opensora_stdit3(
    model: STDiT, state_dict: Mapping[str, torch.Tensor], *, fps: float | None = 24.0
) -> tuple[list[str], list[str]]:
    """Copy an STDiT3 state dict into `model` -> (missing, unexpected).

    missing: parameters of `model` (outside the new action encoder) the checkpoint did not give.
    unexpected: checkpoint keys neither mapped nor in SKIPPED_PREFIXES.
    fps: the fps whose embedding is folded into the timestep bias (None: drop the fps embedder).
    A tensor whose shape does not fit raises ValueError naming the key: the preset is wrong.
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    own = model.state_dict()
    C = model.cfg.in_channels
    new: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in sd.items():
        if key.startswith(SKIPPED_PREFIXES):
            continue
        if key not in own:
            unexpected.append(key)
            continue
        if key.startswith("final_layer.linear."):
            if value.shape[0] == 2 * own[key].shape[0]:  # (P * 2C, ...) -> velocity half (P * C, ...)
                halves = rearrange(value, "(P two C) ... -> P two C ...", two=2, C=C)
                value = rearrange(halves[:, 0], "P C ... -> (P C) ...")
            value = -value  # x0 - noise -> noise - x0
        if value.shape != own[key].shape:
            raise ValueError(
                f"Open-Sora key {key!r}: checkpoint shape {tuple(value.shape)} != model shape "
                f"{tuple(own[key].shape)}; build the model with STDiT_models['XL/2'] and matching in_channels"
            )
        new[key] = value.to(own[key].dtype)
    if fps is not None and "fps_embedder.mlp.0.weight" in sd and "t_embedder.mlp.2.bias" in new:
        bias = new["t_embedder.mlp.2.bias"]
        new["t_embedder.mlp.2.bias"] = bias + _fps_vector(sd, fps, bias.device).to(bias.dtype)
    missing = [k for k in own if k not in new and not k.startswith(NEW_PREFIXES)]
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(new, strict=False, assign=on_meta)
    return missing, unexpected
