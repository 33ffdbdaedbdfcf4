"""Temporal modules between the blocks of a timm ViT: AIM's and ST-Adapter's placement.

:func:`insert_temporal` returns a view of the ViT in which chosen transformer blocks are
preceded by a temporal module (PKS4 or any kind of :func:`create_temporal`). Inside the ViT the
frames of a clip are a batch of ``B * T`` images, so each inserted module regroups the tokens
``(B * T, N, C)`` into clips ``(B, T, N, C)``, runs, and ungroups them. The modules start as the
identity: the pretrained ViT's features are unchanged at insertion. The user's ViT is left as
it was (its blocks are shared, not copied).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Optional

from einops import rearrange
from torch import Tensor, nn

from .temporal_heads import create_temporal

__all__ = ["TemporalBeforeBlock", "insert_temporal"]


class TemporalBeforeBlock(nn.Module):
    """``block(temporal(x))`` on the ``B * T`` frames of ``num_frames``-frame clips.

    Shapes: ``(B * T, N, C)`` tokens in and out, ``N = num_prefix_tokens + H * W``.
    """

    def __init__(
        self,
        block: nn.Module,
        temporal: nn.Module,
        num_frames: int,
        grid: tuple[int, int],
        num_prefix_tokens: int,
    ) -> None:
        super().__init__()
        self.block = block
        self.temporal = temporal
        self.num_frames = num_frames
        self.grid = tuple(grid)
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if x.dim() != 3 or x.shape[0] % self.num_frames:
            raise ValueError(
                f"x: expected tokens (B*T, N, C) of clips of num_frames={self.num_frames} "
                f"frames, got {tuple(x.shape)} (build the model with the clips' length)"
            )
        clips = rearrange(x, "(b t) n c -> b t n c", t=self.num_frames)
        clips = self.temporal(clips, grid=self.grid, num_prefix_tokens=self.num_prefix_tokens)
        return self.block(rearrange(clips, "b t n c -> (b t) n c"), *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_frames={self.num_frames}, grid={self.grid}"


def insert_temporal(
    vit: nn.Module,
    num_frames: int,
    *,
    kind: str = "pks4",
    blocks: Optional[Sequence[int]] = None,
    **kwargs,
) -> nn.Module:
    """A view of the timm ViT ``vit`` with a temporal module before each of ``blocks``.

    Args:
        vit: a timm Vision Transformer (``blocks``, ``patch_embed.grid_size``,
            ``num_prefix_tokens``, ``embed_dim``), left unchanged.
        num_frames: frames per clip: the ViT then runs on ``B * num_frames`` images at a time.
        kind: the temporal module (:func:`~pks4_layers.models.create_temporal`).
        blocks: indices of the blocks to precede (negative from the end); default every block.
        **kwargs: the temporal module's arguments (``inner_dim=...`` for a bottleneck).

    Returns:
        a module that shares every parameter of ``vit`` and owns the new temporal modules, as
        ``model.blocks[i].temporal``; ``FrameBackbone`` and ``PKS4VideoClassifier`` take it
        like the ViT itself (with ``num_frames`` the same).
    """
    layers = getattr(vit, "blocks", None)
    embed = getattr(vit, "patch_embed", None)
    if not isinstance(layers, (nn.Sequential, nn.ModuleList)) or embed is None:
        raise ValueError(
            f"vit: expected a timm Vision Transformer (blocks and patch_embed), got "
            f"{type(vit).__name__}"
        )
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames: expected a positive int, got {num_frames!r}")
    count = len(layers)
    chosen = range(count) if blocks is None else blocks
    indices = set()
    for i in chosen:
        if not isinstance(i, int) or not -count <= i < count:
            raise ValueError(f"blocks: expected indices in [{-count}, {count}), got {list(chosen)}")
        indices.add(i % count)
    grid = tuple(int(g) for g in embed.grid_size)
    dim = int(getattr(vit, "embed_dim", None) or vit.num_features)
    prefix = int(getattr(vit, "num_prefix_tokens", 0) or 0)
    new_blocks = [
        TemporalBeforeBlock(block, create_temporal(kind, dim, **kwargs), num_frames, grid, prefix)
        if i in indices
        else block
        for i, block in enumerate(layers)
    ]
    view = copy.copy(vit)
    view._modules = dict(vit._modules)
    view._parameters = dict(vit._parameters)
    view._buffers = dict(vit._buffers)
    view._modules["blocks"] = (
        nn.Sequential(*new_blocks)
        if isinstance(layers, nn.Sequential)
        else nn.ModuleList(new_blocks)
    )
    return view
