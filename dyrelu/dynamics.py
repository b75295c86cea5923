"""How dynamic is a DY-ReLU? Statistics of its coefficients over images, as pure functions of tensors.

``LayerDynamics`` accumulates one layer's coefficients a, b (N, K, W) and, for variant C, its
attention pi (N, 1, *spatial) batch by batch; ``result()`` gives every measure below.
``dynamics_of(a, b, pi, ...)`` is the same for one batch. ``scripts/inspect_dynamic.py`` runs them
over a validation set; the tests call them on hand-made tensors.

Definitions (a unit is one (image, channel) function of a layer; one per image for DY-ReLU-A):

  a_spread, b_spread     std over images of each coefficient a_c^k (b_c^k), averaged over channels
                         and segments. 0: every image gets the same function.
  a_spread_rel, b_spread_rel  the same divided by lambda_a (lambda_b), the residual's range (Eq. 3).
  a_dist, b_dist         distance of the mean function from the initial one: |mean_i a_c^k - alpha^k|
                         (|mean_i b_c^k - beta^k|), averaged over channels and segments. 0: on average
                         the layer is still its initial function (ReLU for alpha = (1, 0), beta = 0).
  band_x_pos, band_x_neg Fig. 3's band: for each channel, the 10-90 % range over images of
                         y = max_k(a_c^k x + b_c^k) at x = +0.5 (x = -0.5); the median over channels.
                         For variant C the function before pi (pi only rescales it per position).
                         Over the first ``band_images`` images (all of them on small sets).
  share_slope_margin     the share of units with some segment a^k < -SLOPE_MARGIN or a^k > 1 + SLOPE_MARGIN:
                         Sec. 5.2's "negative slope or slope above 1" with a stated margin, so that a
                         DY-ReLU at an initial function with slopes in [0, 1] scores 0.
  share_intercept_gt_0.05  units with some b^k > INTERCEPT_MARGIN (0.05, the paper's own threshold).
  share_abs_intercept_gt_0.05  units with some |b^k| > 0.05.
  slope_diff_mean, slope_diff_std  max_k a^k - min_k a^k per unit (|a^1 - a^2| for K = 2), over units.
  pi_flatness            DY-ReLU-C: the std of pi over positions, averaged over images. 0: a flat
                         attention (every position weighted 1/3); it says nothing of the input.
  pi_input_var           DY-ReLU-C: at each position, the std of pi over images divided by its mean
                         over images; averaged over positions. 0: the attention map is the same for
                         every image (flat or not). Needs the same spatial size for every image.

Sums are taken relative to the first image seen, so a layer that gives every image the same
coefficients scores exactly 0 (no rounding residue).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

SLOPE_MARGIN = 0.05
INTERCEPT_MARGIN = 0.05
#: the inputs x at which Fig. 3's band is read
BAND_X = (0.5, -0.5)

__all__ = ["BAND_X", "INTERCEPT_MARGIN", "LayerDynamics", "SLOPE_MARGIN", "dynamics_of", "module_dynamics"]


class _Moments:
    """Running mean and std over the first dim of equally shaped tensors, shifted by the first row."""

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def add(self, t: torch.Tensor) -> None:
        t = t.detach().double()
        if self.shift is None:
            self.shift = t[0].clone()
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros_like(self.shift)
        d = t - self.shift
        self.s1 += d.sum(0)
        self.s2 += (d * d).sum(0)
        self.n += t.shape[0]

    def mean(self) -> torch.Tensor:
        return self.shift + self.s1 / self.n

    def std(self) -> torch.Tensor:
        m = self.s1 / self.n
        return (self.s2 / self.n - m * m).clamp(min=0.0).sqrt()


def _cv(m: _Moments) -> float:
    """Std over images / mean over images at each position, averaged over positions."""
    return float((m.std() / m.mean().clamp(min=1e-12)).mean())


class LayerDynamics:
    """The measures of the module docstring for one DY-ReLU layer, accumulated over batches.

    init_a, init_b: alpha^k, beta^k (K,); lambda_a, lambda_b: the residual ranges (Eq. 3).
    """

    def __init__(self, init_a: Sequence[float], init_b: Sequence[float], lambda_a: float, lambda_b: float,
                 band_images: int = 2000):
        self.init_a = torch.as_tensor(init_a, dtype=torch.float64).flatten().cpu()
        self.init_b = torch.as_tensor(init_b, dtype=torch.float64).flatten().cpu()
        self.lambda_a, self.lambda_b = float(lambda_a), float(lambda_b)
        self.band_images = int(band_images)
        self.a, self.b = _Moments(), _Moments()
        self.pi = _Moments()
        self.pi_shape_ok, self.has_pi = True, False
        self.pi_pos_std_sum = 0.0
        self.units = self.slope = self.int_pos = self.int_abs = 0
        self.diff_sum = self.diff_sq = 0.0
        self.band = {x: [] for x in BAND_X}
        self.band_seen = 0

    @classmethod
    def for_module(cls, module, band_images: int = 2000) -> "LayerDynamics":
        """For a ``dyrelu.DyReLU`` (or its static twin): its alpha, beta and lambdas."""
        return cls(module.init_a.detach().cpu(), module.init_b.detach().cpu(), float(module.lambda_a),
                   float(module.lambda_b), band_images)

    def update(self, a: torch.Tensor, b: torch.Tensor, pi: Optional[torch.Tensor] = None) -> None:
        """Add a batch: a, b (N, K, W) as ``DyReLU.coefficients`` gives them; pi (N, 1, *spatial) or None."""
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        self.units += a.shape[0] * a.shape[2]
        self.slope += int(((a < -SLOPE_MARGIN) | (a > 1.0 + SLOPE_MARGIN)).any(dim=1).sum())
        self.int_pos += int((b > INTERCEPT_MARGIN).any(dim=1).sum())
        self.int_abs += int((b.abs() > INTERCEPT_MARGIN).any(dim=1).sum())
        diff = (a.max(dim=1).values - a.min(dim=1).values).flatten()
        self.diff_sum += float(diff.sum())
        self.diff_sq += float((diff * diff).sum())
        self.a.add(a)
        self.b.add(b)
        take = min(a.shape[0], self.band_images - self.band_seen)
        if take > 0:
            for x in BAND_X:
                self.band[x].append((a[:take] * x + b[:take]).max(dim=1).values)  # (take, W)
            self.band_seen += take
        if pi is not None:
            self.has_pi = True
            p = pi.detach().double().cpu().flatten(1)  # (N, positions)
            self.pi_pos_std_sum += float(p.std(dim=1, correction=0).sum())
            if self.pi.shift is not None and self.pi.shift.shape[0] != p.shape[1]:
                self.pi_shape_ok = False  # another spatial size: per-position statistics undefined
            elif self.pi_shape_ok:
                self.pi.add(p)

    @staticmethod
    def pi_input_var_of(pi: torch.Tensor) -> float:
        """``pi_input_var`` of one batch of attention maps pi (N, 1, *spatial)."""
        acc = _Moments()
        acc.add(pi.flatten(1))
        return _cv(acc)

    def result(self) -> dict:
        n_img = self.a.n
        if not n_img:
            return {"images": 0, "units": 0}
        k = self.a.shift.shape[0]
        init_a, init_b = self.init_a[:k].reshape(k, 1), self.init_b[:k].reshape(k, 1)
        a_spread, b_spread = float(self.a.std().mean()), float(self.b.std().mean())
        mean_diff = self.diff_sum / self.units
        out = {
            "images": n_img,
            "units": self.units,
            "share_slope_margin": self.slope / self.units,
            "share_intercept_gt_0.05": self.int_pos / self.units,
            "share_abs_intercept_gt_0.05": self.int_abs / self.units,
            "slope_diff_mean": mean_diff,
            "slope_diff_std": max(self.diff_sq / self.units - mean_diff * mean_diff, 0.0) ** 0.5,
            "a_spread": a_spread,
            "b_spread": b_spread,
            "a_spread_rel": a_spread / self.lambda_a if self.lambda_a else None,
            "b_spread_rel": b_spread / self.lambda_b if self.lambda_b else None,
            "a_dist": float((self.a.mean() - init_a).abs().mean()),
            "b_dist": float((self.b.mean() - init_b).abs().mean()),
        }
        for x, key in zip(BAND_X, ("band_x_pos", "band_x_neg")):
            y = torch.cat(self.band[x])  # (images, W)
            q = torch.quantile(y, torch.tensor([0.1, 0.9], dtype=y.dtype), dim=0)
            out[key] = float(torch.quantile(q[1] - q[0], 0.5))  # the median (the middle two averaged)
        out["pi_flatness"] = self.pi_pos_std_sum / n_img if self.has_pi else None
        if self.has_pi and self.pi_shape_ok:
            out["pi_input_var"] = _cv(self.pi)
        else:
            out["pi_input_var"] = None
        return out


def dynamics_of(a: torch.Tensor, b: torch.Tensor, pi: Optional[torch.Tensor] = None, *,
                init_a: Sequence[float] = (1.0, 0.0), init_b: Sequence[float] = (0.0, 0.0),
                lambda_a: float = 1.0, lambda_b: float = 0.5) -> dict:
    """Every measure of the module docstring for one batch of coefficients (a, b (N, K, W), pi)."""
    acc = LayerDynamics(init_a, init_b, lambda_a, lambda_b, band_images=a.shape[0])
    acc.update(a, b, pi)
    return acc.result()


@torch.no_grad()
def module_dynamics(module, x: torch.Tensor) -> dict:
    """The measures of a DyReLU (or its static twin) on the images of ``x`` (its input)."""
    acc = LayerDynamics.for_module(module, band_images=x.shape[0])
    co = module.coefficients(x)
    acc.update(co.a, co.b, co.pi)
    return acc.result()
