"""One SAE's nonzero latent activations in delphi's splits, gathered as a pass over the
collection goes: held in memory up to a budget, then written to part files, and at the end
merged into one file per split of latents.

A split holds latents start..end (inclusive, delphi's `_generate_split_indices`); its
locations are (sequence, position, latent - start), its activations float16.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save
from torch import Tensor

from saesweep.store.file import write_atomic


def split_bounds(d_sae: int, n_splits: int) -> list[tuple[int, int]]:
    """(start, end) of each split, end inclusive, as delphi's LatentCache cuts them."""
    edges = torch.linspace(0, d_sae, steps=n_splits + 1).long().tolist()
    return [(a, b - 1) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    data = save(arrays)
    write_atomic(path, lambda f: f.write(data))


def narrow_locations(locations: Tensor) -> np.ndarray:
    """Locations as uint16 where they fit (as delphi writes them), else uint32."""
    fits = len(locations) == 0 or int(locations.max()) < 2**16
    return locations.numpy().astype(np.uint16 if fits else np.uint32)


@dataclass
class LatentParts:
    """One SAE's latents for one module directory: `add` gathers, `spill` writes what is
    held to part files under `parts`, `write` merges everything into `module_dir`."""

    bounds: list[tuple[int, int]]
    parts: Path
    held: list[list[tuple[Tensor, Tensor]]] = field(default_factory=list)
    n_spills: int = 0

    def __post_init__(self):
        self.held = [[] for _ in self.bounds]

    @property
    def nbytes(self) -> int:
        return sum(loc.nbytes + act.nbytes for split in self.held for loc, act in split)

    def add(self, seqs: Tensor, positions: Tensor, acts: Tensor) -> None:
        """The nonzero entries of `acts` [rows, d_sae] of tokens at (seqs, positions)."""
        rows, latents = acts.nonzero(as_tuple=True)
        values = acts[rows, latents].to(torch.float16)
        starts = torch.tensor([start for start, _ in self.bounds])
        which = torch.searchsorted(starts, latents, right=True) - 1
        for s, (start, _) in enumerate(self.bounds):
            mask = which == s
            where = torch.stack([seqs[rows[mask]], positions[rows[mask]], latents[mask] - start])
            self.held[s].append((where.T.to(torch.int64), values[mask]))

    def taken(self, s: int) -> tuple[Tensor, Tensor]:
        """Split s's held locations and activations, released."""
        held, self.held[s] = self.held[s], []
        locations = torch.cat([loc for loc, _ in held]) if held else torch.zeros(0, 3).long()
        acts = torch.cat([a for _, a in held]) if held else torch.zeros(0, dtype=torch.float16)
        return locations, acts

    def spill(self) -> None:
        for s in range(len(self.bounds)):
            locations, acts = self.taken(s)
            part = {"locations": locations.numpy(), "activations": acts.numpy()}
            write_arrays(self.parts / f"{s}-{self.n_spills}.safetensors", part)
        self.n_spills += 1

    def merged(self, s: int) -> tuple[Tensor, Tensor]:
        """Split s whole: its part files, then what is still held."""
        files = [load_file(self.parts / f"{s}-{i}.safetensors") for i in range(self.n_spills)]
        locations, acts = self.taken(s)
        locations = torch.cat([*(torch.from_numpy(f["locations"]) for f in files), locations])
        acts = torch.cat([*(torch.from_numpy(f["activations"]) for f in files), acts])
        return locations, acts

    def write(self, module_dir: Path, tokens: Tensor) -> None:
        """One file per split, START_END.safetensors: locations, activations, tokens."""
        for s, (start, end) in enumerate(self.bounds):
            locations, acts = self.merged(s)
            arrays = {"locations": narrow_locations(locations), "activations": acts.numpy()}
            write_arrays(module_dir / f"{start}_{end}.safetensors", arrays | {"tokens": tokens})
