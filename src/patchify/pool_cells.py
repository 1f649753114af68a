"""Pool mode's cells: every pyramid cell of an image described from ONE shared ViT pass.

Blocks ``[0, split_block)`` of the encoder's ViT run once on the whole image; then each cell
(a rectangle of the token grid) is finished on its own (``split``: the remaining blocks on its
tokens alone, optionally with the position embeddings a crop of its size would get: ``local``)
or alongside the image (``masked``: one masked class token per cell). Used by
src/patchify/extraction.py (``extract_pooled``) and checked before any work by
src/patchify/features.py (``check_against_model``). Crop mode does not use this module.
"""

from __future__ import annotations

from typing import Sequence

import torch
from timm.layers import resample_abs_pos_embed

from .model import Encoder, ModelConfigError

POOL_METHODS = ("split", "masked")
CELL_POSITIONS = ("local", "global")

@torch.inference_mode()

def check_pool_settings(encoder: Encoder, split_block: int, method: str, cell_pos: str | None = None,
                        layers: Sequence[int] | None = None) -> tuple[str, list[int]]:
    """Pool mode's settings against this backbone (ModelConfigError, one line); returns the cell
    positions and the sorted block indices asked for. Called before any work and by ``describe_cells``."""
    if not encoder.is_vit or encoder.pool in ("head", "projection"):
        raise ModelConfigError("pyramid.mode=pool needs a ViT backbone with pool cls, mean or gem")
    if method not in POOL_METHODS:
        raise ModelConfigError(f"pyramid.pool_method must be one of {POOL_METHODS}, got {method!r}")
    cell_pos = cell_pos or ("local" if method == "split" else "global")
    if cell_pos not in CELL_POSITIONS:
        raise ModelConfigError(f"pyramid.pool_cell_pos must be one of {CELL_POSITIONS}, got {cell_pos!r}")
    if cell_pos == "local" and method != "split":
        raise ModelConfigError("pyramid.pool_cell_pos=local needs pool_method=split (masked cells share the "
                               "image's tokens and positions); set pyramid.pool_cell_pos=global")
    top = len(encoder.backbone.blocks) - 1
    layers = [encoder.layer] if layers is None else list(layers)
    wanted = sorted({top if layer == -1 else layer for layer in layers})
    if not 0 <= split_block <= wanted[0] + 1 or wanted[-1] > top:
        raise ModelConfigError(f"pyramid.pool_split_block={split_block}: must be in 0..{wanted[0] + 1} (the "
                               f"block after model.layer={layers[0]}), layers in 0..{top}")
    return cell_pos, wanted


@torch.inference_mode()

def describe_cells(encoder: Encoder, images: torch.Tensor, cells: Sequence[tuple[int, int, int, int]], split_block: int,
                   method: str = "split", layers: Sequence[int] | None = None,
                   cell_pos: str | None = None) -> list[torch.Tensor]:
    """Descriptors (B, n_cells, D) of token-grid cells from one shared pass, per layer (ViTs; pool mode).

    Blocks ``[0, split_block)`` run once on the whole image. Each cell
    ``(row0, row1, col0, col1)`` (token units, end excluded) gets its own
    copy of the class token, which from then on attends to that cell alone:

    - ``split``: each cell runs the remaining blocks on its own tokens only,
      as if it had been cropped (cost grows with the number of levels).
      ``cell_pos="local"`` completes the crop: at the split, each cell's
      tokens trade the position embeddings of their place in the image for
      those of a whole image of the cell's token size (the embedding table
      resampled as timm does for another input size), so from block 0 a
      cell is exactly a crop of its pixels; ``"global"`` keeps the image's
      (default: local);
    - ``masked``: the image's tokens run the remaining blocks once, as in a
      normal forward, and the cells' class tokens ride along, each masked to
      attend to itself and its cell's tokens (cost: one pass plus one token
      per cell); its cells keep the image's positions (``cell_pos`` global, the default).

    The whole grid as one cell is exactly a normal forward, in both methods.
    """
    net = encoder.backbone
    cell_pos, wanted = check_pool_settings(encoder, split_block, method, cell_pos, layers)
    top = len(net.blocks) - 1
    layers = [encoder.layer] if layers is None else list(layers)
    images = images.to(encoder.dtype)
    x = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(images))))
    for block in net.blocks[:split_block]:
        x = block(x)
    if method == "split":
        by_layer = _cells_split(encoder, x, cells, split_block, wanted, _grid_positions(encoder) if cell_pos == "local" else None)
    else:
        by_layer = _cells_masked(encoder, x, cells, split_block, wanted)
    return [by_layer[top if layer == -1 else layer] for layer in layers]


def _finish(encoder: Encoder, sequence: torch.Tensor, prefix_count: int, layer: int) -> torch.Tensor:
    """Pooled, normalised descriptors of (n, prefix + tokens, C) sequences at ``layer``'s output."""
    if encoder.norm_intermediate or layer == len(encoder.backbone.blocks) - 1:
        sequence = encoder.backbone.norm(sequence)
    return encoder.pool_tokens(sequence[:, :prefix_count], sequence[:, prefix_count:])


def _grid_positions(encoder: Encoder) -> torch.Tensor:
    """The patch tokens' position embeddings as a (rows, cols, C) grid (ViTs with learned absolute ones)."""
    net = encoder.backbone
    rows, cols = net.patch_embed.grid_size
    if getattr(net, "pos_embed", None) is None:
        raise ModelConfigError("pyramid.pool_cell_pos=local needs learned absolute position embeddings; "
                               "set pyramid.pool_cell_pos=global")
    grid = net.pos_embed[0, 0 if net.no_embed_class else net.num_prefix_tokens:]
    if grid.shape[0] != rows * cols:
        raise ModelConfigError(f"pyramid.pool_cell_pos=local: {grid.shape[0]} position embeddings for a "
                               f"{rows}x{cols} token grid; set pyramid.pool_cell_pos=global")
    return grid.reshape(rows, cols, -1)


def _cells_split(encoder: Encoder, x: torch.Tensor, cells, split_block: int, wanted: list[int],
                 positions_grid: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """``positions_grid`` (rows, cols, C): re-embed each cell's tokens at its own size (``cell_pos="local"``)."""
    net = encoder.backbone
    batch, _, width = x.shape
    rows, cols = net.patch_embed.grid_size
    prefix_count = net.num_prefix_tokens
    prefix, grid = x[:, :prefix_count], x[:, prefix_count:].reshape(batch, rows, cols, width)
    out = {layer: torch.empty(batch, len(cells), width, device=x.device, dtype=torch.float32) for layer in wanted}
    groups: dict[tuple[int, int], list[int]] = {}
    for position, (r0, r1, c0, c1) in enumerate(cells):
        groups.setdefault((r1 - r0, c1 - c0), []).append(position)
    for (height, span), positions in groups.items():
        tokens = torch.stack([grid[:, cells[p][0]:cells[p][1], cells[p][2]:cells[p][3]].reshape(batch, height * span, width)
                              for p in positions], dim=1)
        if positions_grid is not None and (height, span) != (rows, cols):
            placed = torch.stack([positions_grid[cells[p][0]:cells[p][1], cells[p][2]:cells[p][3]].reshape(height * span, width)
                                  for p in positions])
            own = resample_abs_pos_embed(positions_grid.reshape(1, rows * cols, width), new_size=[height, span],
                                         old_size=[rows, cols], num_prefix_tokens=0)
            tokens = tokens - placed.to(tokens.dtype) + own.to(tokens.dtype)
        heads = prefix.unsqueeze(1).expand(batch, len(positions), prefix_count, width)
        sequence = torch.cat([heads, tokens], dim=2).reshape(batch * len(positions), -1, width)
        for index in range(split_block - 1, wanted[-1] + 1):  # split_block - 1: the shared output
            if index >= split_block:
                sequence = net.blocks[index](sequence)
            if index in out:
                out[index][:, positions] = _finish(encoder, sequence, prefix_count, index).reshape(batch, len(positions), -1)
    return out


def _cells_masked(encoder: Encoder, x: torch.Tensor, cells, split_block: int, wanted: list[int]) -> dict[int, torch.Tensor]:
    net = encoder.backbone
    batch, length, width = x.shape
    cols = net.patch_embed.grid_size[1]
    prefix_count = net.num_prefix_tokens
    count = len(cells)
    # Attention mask (additive, shared by the batch and heads): the image's own tokens see
    # each other as usual and never the cell tokens; cell token i sees itself and its cell.
    allowed = torch.zeros(length + count, length + count, dtype=torch.bool, device=x.device)
    allowed[:length, :length] = True
    for i, (r0, r1, c0, c1) in enumerate(cells):
        rows = torch.arange(r0, r1, device=x.device)
        columns = torch.arange(c0, c1, device=x.device)
        allowed[length + i, (prefix_count + rows[:, None] * cols + columns[None, :]).reshape(-1)] = True
        allowed[length + i, length + i] = True
    mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
    sequence = torch.cat([x, x[:, :1].expand(batch, count, width)], dim=1)
    out = {}
    for index in range(split_block - 1, wanted[-1] + 1):  # split_block - 1: the shared output
        if index >= split_block:
            sequence = net.blocks[index](sequence, attn_mask=mask)
        if index in wanted:
            cell_cls = sequence[:, length:].reshape(batch * count, 1, width)
            if encoder.pool == "cls":
                out[index] = _finish(encoder, cell_cls, 1, index).reshape(batch, count, -1)
            else:  # mean / gem of each cell's (globally contextualised) tokens
                out[index] = torch.stack([
                    _finish(encoder, sequence[:, allowed[length + i, :length].nonzero().squeeze(1)], 0, index)
                    for i in range(count)], dim=1)
    return out
