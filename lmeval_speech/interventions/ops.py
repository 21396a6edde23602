"""The seed paper's two edits of a speech hidden state, as pure tensor functions.

* Angle projection keeps the speech state's norm and takes the aligned text state's direction:
  ``h' = ||h_s|| * h_t / ||h_t||``.
* Length normalization keeps the speech state's direction and takes the text norm:
  ``h' = ||h_t|| * h_s / ||h_s||``.

``random_angle`` and ``random_length`` are their controls: an edit of the same size (the same rotation
angle, the same log-norm change) in a random direction, seeded per item and layer, so that a change in
accuracy can be told apart from what any edit of that size does.

``steer`` adds a steering vector (``interventions/steer.py``), ``random_steer`` its same-size control.

``strength`` in [0, 1] interpolates: the direction along the great circle (slerp) for the angle,
the norm in log space for the length; 1 is the paper's full edit, 0 leaves the state unchanged; for ``steer`` it scales the vector (any value >= 0).
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


def random_angle(h_s: torch.Tensor, h_t: torch.Tensor, strength: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The control of :func:`angle_projection`: the same norm and the same angle of rotation (the angle
    between ``h_s`` and ``h_t``, times ``strength``), towards a random direction orthogonal to ``h_s``
    instead of the text state's. An edit of the same size that carries no text information."""
    u, v = _unit(h_s), _unit(h_t)
    theta = torch.arccos((u * v).sum(-1, keepdim=True).clamp(-1.0, 1.0)) * strength
    r = torch.randn(h_s.shape, generator=generator, dtype=torch.float32).to(h_s.dtype)
    r = _unit(r - (r * u).sum(-1, keepdim=True) * u)
    return h_s.norm(dim=-1, keepdim=True) * (torch.cos(theta) * u + torch.sin(theta) * r)


def random_length(h_s: torch.Tensor, h_t: torch.Tensor | float, strength: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The control of :func:`length_normalization`: the norm scaled by the same factor |log(target/norm)|
    in a random direction of change (up or down, a fair coin per state), direction kept."""
    edited = length_normalization(h_s, h_t, strength)
    log_ratio = torch.log(edited.norm(dim=-1, keepdim=True).clamp_min(EPS)) - torch.log(h_s.norm(dim=-1, keepdim=True).clamp_min(EPS))
    sign = torch.where(torch.rand(log_ratio.shape, generator=generator) < 0.5, -1.0, 1.0).to(h_s.dtype)
    return h_s * torch.exp(sign * log_ratio.abs())


def steer(h_s: torch.Tensor, v: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Add the steering vector (mean text - speech state, ``interventions/steer.py``) times ``strength``."""
    return h_s + strength * v


def random_steer(h_s: torch.Tensor, v: torch.Tensor, strength: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The control of :func:`steer`: add a random direction (one per state) of the same norm ``strength |v|``."""
    r = _unit(torch.randn(h_s.shape, generator=generator, dtype=torch.float32).to(h_s.dtype))
    return h_s + strength * v.norm(dim=-1, keepdim=True) * r


OPS = {"angle": angle_projection, "length": length_normalization,
       "random_angle": random_angle, "random_length": random_length, "steer": steer, "random_steer": random_steer}
#: the same-size random controls, which draw from a generator seeded per item and layer
RANDOM_OPS = {"random_angle", "random_length", "random_steer"}
#: edits by a steering vector file (``calibration=``), which need no text twin
STEER_OPS = {"steer", "random_steer"}
