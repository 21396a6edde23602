"""The seed paper's two edits of a speech hidden state, as pure tensor functions.

* Angle projection keeps the speech state's norm and takes the aligned text state's direction:
  ``h' = ||h_s|| * h_t / ||h_t||``.
* Length normalization keeps the speech state's direction and takes the text norm:
  ``h' = ||h_t|| * h_s / ||h_s||``.

``strength`` in [0, 1] interpolates: the direction along the great circle (slerp) for the angle,
the norm in log space for the length; 1 is the paper's full edit, 0 leaves the state unchanged.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def slerp(u: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between unit vectors (rows)."""
    if t == 1.0:
        return v
    if t == 0.0:
        return u
    cos = (u * v).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    near = sin.abs() < 1e-6  # (anti)parallel: fall back to normalized lerp
    a = torch.where(near, 1.0 - t, torch.sin((1 - t) * omega) / sin.clamp_min(EPS))
    b = torch.where(near, t, torch.sin(t * omega) / sin.clamp_min(EPS))
    return _unit(a * u + b * v)


def angle_projection(h_s: torch.Tensor, h_t: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    norm = h_s.norm(dim=-1, keepdim=True)
    return norm * slerp(_unit(h_s), _unit(h_t), strength)


def length_normalization(h_s: torch.Tensor, h_t: torch.Tensor | float, strength: float = 1.0) -> torch.Tensor:
    """``h_t`` may be text states (their norms are used) or target norms directly."""
    target = h_t.norm(dim=-1, keepdim=True) if torch.is_tensor(h_t) and h_t.dim() == h_s.dim() else torch.as_tensor(h_t, dtype=h_s.dtype)
    if torch.is_tensor(target) and target.dim() == h_s.dim() - 1:
        target = target.unsqueeze(-1)
    src = h_s.norm(dim=-1, keepdim=True).clamp_min(EPS)
    norm = torch.exp((1 - strength) * torch.log(src) + strength * torch.log(torch.as_tensor(target, dtype=h_s.dtype).clamp_min(EPS)))
    return norm * _unit(h_s)


OPS = {"angle": angle_projection, "length": length_normalization}
