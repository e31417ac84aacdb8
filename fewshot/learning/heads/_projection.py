"""Learned projections shared by the trainable heads: an MLP on vectors, or a small conv net on
flattened feature maps.

``arch="mlp"``: Linear -> BatchNorm/LayerNorm -> ReLU -> Dropout -> Linear.
``arch="conv"`` (needs ``in_shape=(C, H, W)``; the input is the C-major flattened map, as
``tensor.flatten(1)`` gives): ``blocks`` x (Conv3x3 -> BatchNorm2d (GroupNorm for norm="layer") -> ReLU),
with a 2x2 max-pool
after the first block, then adaptive average pooling to a ``pool_size`` x ``pool_size`` grid
(1 = global average pooling, translation invariant), flatten, Linear to ``out_dim``. Convolutions
over frozen intermediate feature maps are what let a head learn stroke structure.
"""

from __future__ import annotations

from torch import nn

from ...checks import check_int
from ..base import MAX_WIDTH, check_choice

ARCHS = ("mlp", "conv")
NORMS = ("batch", "layer", "none")


class _Unflatten(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(len(x), *self.shape)


def build_projection(in_dim: int, in_shape, *, arch: str, hidden: int, out_dim: int, norm: str,
                     dropout: float, channels: int, blocks: int, pool_size: int) -> nn.Module:
    """The projection network (build it inside ``seeded(seed)`` for reproducible weights)."""
    check_choice(arch, "arch", ARCHS)
    check_choice(norm, "norm", NORMS)
    out_dim = check_int(out_dim, "out_dim", high=MAX_WIDTH)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if arch == "mlp":
        hidden = check_int(hidden, "hidden", high=MAX_WIDTH)
        norm_layer = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}.get(norm)
        return nn.Sequential(
            nn.Linear(in_dim, hidden),
            norm_layer(hidden) if norm_layer else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )
    if in_shape is None:
        raise ValueError("arch='conv' needs in_shape=(C, H, W): the features must be flattened feature maps")
    channels, pool_size = check_int(channels, "channels", high=MAX_WIDTH), check_int(pool_size, "pool_size", high=64)
    if check_int(blocks, "blocks") not in (2, 3):
        raise ValueError(f"blocks must be 2 or 3, got {blocks}")
    c, h, w = in_shape
    layers: list[nn.Module] = [_Unflatten(in_shape)]
    for i in range(blocks):
        layers += [nn.Conv2d(c if i == 0 else channels, channels, 3, padding=1, bias=norm == "none"),
                   _norm2d(norm, channels),
                   nn.ReLU(inplace=True)]
        if i == 0 and min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
    layers += [nn.AdaptiveAvgPool2d(pool_size), nn.Flatten(), nn.Dropout(dropout),
               nn.Linear(channels * pool_size * pool_size, out_dim)]
    return nn.Sequential(*layers)


def _norm2d(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(1, channels) if norm == "layer" else nn.Identity()


def projection_params(params: dict) -> dict:
    """The projection's keyword arguments out of a head's parameters."""
    keys = ("arch", "hidden", "out_dim", "norm", "dropout", "channels", "blocks", "pool_size")
    return {k: params[k] for k in keys}
