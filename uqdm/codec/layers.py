"""Quality layers inside a step by successive refinement: every layer narrows symbols' intervals.

A step's symbol k has the table P over the entries k = −R … R (`tables.StepModel`; the end entries
hold the tails). A symbol's interval narrows through the stages m = 0 … M of its `ladder` of bin
widths w (the powers of 2 from the largest ≤ R/2 down to 1, in units of Δ): at stage m the decoder
knows which cell of the entries holds k, a cell being an intersection of the bins
b = ⌊(k − u)/w + ½⌋ (centred on the prior's mean) of the first m widths; stage 0 knows nothing and
the last width, 1, is k itself. A layer sends, for each symbol it
advances from stage c to stage m, which stage-m cell inside its stage-c cell holds k, coded with
the masses of those cells, differences of the table's CDF (bit-identical on both sides); so the
layers of a step add up to the one-layer code length (chain rule), and only their quantisation by
the range coder and their endings cost more.

Which layer advances which symbol how far is decided from the tables alone, before the step is
decoded. Under P, stage m leaves an expected variance D_m of x = k − u and costs expected bits R_m.
Each symbol's steps along the lower convex hull of its (R_m, D_m) are increments with a slope
(variance removed per bit, as an integer key 16·log₂) and expected bits (in 1/16 bit); all the
step's increments, by slope (steepest first, ties by symbol then stage), are cut at equal shares of
their bits into the L layers. The first layers thus buy the most expected variance per bit: coarse
cells of wide symbols, and the likeliest-to-differ narrow ones. The keys are rounded from float
sums, which see last-bit differences between machines only as the rounding of `tables.scale_index`
does (a key lands on another integer with probability ~1e-13).

A symbol not exactly known takes its conditional mean E[x | cell] under P, z_s = μ_p + E[x]·Δ (on
Kodak 64×64 with the released tiny weights this beat z_s = μ_p by 5–9 dB in step 1, 2 images,
and was within 0.1 dB of it in steps 2–4; it beat the cell's centre by 0.1–1.4 dB, 8 images:
`scripts/refinement_points.py`).
"""

from collections.abc import Iterator
from dataclasses import dataclass

import math

import torch
from torch import Tensor

from .exact import det_cdf
from .tables import Segment, StepModel, interval_log_mass, scale_value

SLOPE_STEPS = 16  # slope keys: round(16·log₂ of the variance removed per bit)
KEY_LIMIT = (1 << 15) - 1  # above every slope key of float64 (|16·log₂| < 17,200): an int16
ENTRIES = 1 << 16  # table entries handled at once


def ladder(r: int) -> list[int]:
    """The bin widths (in Δ) a symbol of table half-width R narrows through, coarse to exact:
    the powers of 2 from the largest ≤ R/2 down to 1 (dividing k − u by them is exact). Since
    R ≥ TAIL·a + 1, wider bins would hold nearly all of the mass in one."""
    return [1 << m for m in range(max(r // 2, 1).bit_length() - 1, -1, -1)]


def _bins(x: Tensor, width: int) -> Tensor:
    return torch.floor(x / width + 0.5)


class _Group:
    """The symbols `index` of one half-width r (at most about `ENTRIES` table entries in all). Their
    per-entry arrays, O(r) per symbol, are made for the rows asked for and not kept, so that a step
    holds a few integers per symbol between its layers: `x` (positions x = k − u of the entries),
    `cdf` (C[e] = P(entries < e), C[0] = 0, C[2r + 1] = 1) and `bounds` (bound[m][:, e]: entries e
    and e + 1 lie in different stage-m cells). Each is elementwise in the rows, so a subset's
    values are the bits of the whole group's."""

    def __init__(self, model: StepModel, index: Tensor, r: int):
        self.model, self.index, self.r = model, index, r
        self.stages = len(ladder(r))  # the exact stage

    def x(self, rows: Tensor | None = None) -> Tensor:
        index = self.index if rows is None else self.index[rows]
        return torch.arange(-self.r, self.r + 1, dtype=torch.float64) - self.model.u[index, None]

    def cdf(self, rows: Tensor | None = None, x: Tensor | None = None) -> Tensor:
        index = self.index if rows is None else self.index[rows]
        x = self.x(rows) if x is None else x
        cdf = det_cdf(self.model.prior_type, (x[:, 1:] - 0.5) / scale_value(self.model.j[index])[:, None])
        return torch.cat([torch.zeros_like(cdf[:, :1]), cdf, torch.ones_like(cdf[:, :1])], dim=1)

    def bounds(self, x: Tensor) -> Tensor:
        """(stages + 1) × rows × 2r, for the rows whose positions are `x`."""
        bound = torch.zeros(len(x), 2 * self.r, dtype=torch.bool)
        bounds = [bound]
        for w in ladder(self.r):
            b = _bins(x, w)
            bound = bound | (b[:, 1:] != b[:, :-1])
            bounds.append(bound)
        return torch.stack(bounds)


def _cells(bound: Tensor) -> Tensor:
    """Each entry's cell (counted from 0, ascending along a row) from the rows' cell boundaries."""
    return torch.cat([torch.zeros_like(bound[:, :1]), bound], 1).long().cumsum(1)


def _groups(model: StepModel) -> list[_Group]:
    out = []
    for r in torch.unique(model.ranges).tolist():
        index = torch.nonzero(model.ranges == r).squeeze(1)
        out += [_Group(model, part, r) for part in index.split(max(1, ENTRIES // (2 * r + 1)))]
    return out


def _stage_costs(g: _Group) -> tuple[Tensor, Tensor]:
    """D (n × M+1): expected variance of x left at each stage; R: expected bits of its cell."""
    x = g.x()
    P = torch.diff(g.cdf(x=x), dim=1)
    Px = P * x
    Pxx = Px * x
    D, R = [], []
    for bound in g.bounds(x):
        cell = _cells(bound)
        mass = torch.zeros_like(P).scatter_add_(1, cell, P)
        first = torch.zeros_like(P).scatter_add_(1, cell, Px)
        second = torch.zeros_like(P).scatter_add_(1, cell, Pxx)
        tiny = mass.clamp_min(1e-300)
        D.append((second - first**2 / tiny).sum(1).clamp_min(0))
        R.append(-(mass * torch.log2(tiny)).sum(1))
    return torch.stack(D, 1), torch.stack(R, 1)


def _increments(D: Tensor, R: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps along each row's lower convex hull of (R_m, D_m) from stage 0 to the last: (row,
    stage reached, slope key, bits in 1/16 bit), compact (int16, int8, int16, int16: a group has
    fewer than 2^15 rows, a step's expected bits are at most log₂(2R + 1) < 10). A step that
    costs no expected bits gets the top key."""
    rows, stages, keys, bits = [], [], [], []
    last = D.shape[1] - 1
    at = torch.zeros(len(D), 1, dtype=torch.long)
    every = torch.arange(len(D))
    stage = torch.arange(last + 1)[None, :]
    while (live := (at < last).squeeze(1)).any():
        r0 = R.gather(1, at)
        gain = (R - r0).clamp_min(0)
        slope = torch.where((stage > at) & (gain > 1e-12), (D.gather(1, at) - D) / gain.clamp_min(1e-12), -torch.inf)
        best = torch.argmax(slope, 1, keepdim=True)
        steepest = slope.gather(1, best)
        free = steepest == -torch.inf  # no later stage costs bits: go to the end at once
        nxt = torch.where(free, last, best)
        s = steepest.clamp_min(1e-300)
        key = torch.where(free, KEY_LIMIT, torch.round(SLOPE_STEPS * torch.log2(s)).clamp(-KEY_LIMIT, KEY_LIMIT)).squeeze(1)
        cost = torch.round(16 * (R.gather(1, nxt) - r0)).clamp_min(1).squeeze(1)
        nxt = nxt.squeeze(1)
        rows.append(every[live]), stages.append(nxt[live]), keys.append(key[live].long()), bits.append(cost[live].long())
        at = torch.where(live, nxt, at.squeeze(1))[:, None]
    return (torch.cat(rows).to(torch.int16), torch.cat(stages).to(torch.int8), torch.cat(keys).to(torch.int16),
            torch.cat(bits).to(torch.int16))


def plan(model: StepModel, n_layers: int, groups: list[_Group] | None = None) -> Tensor:
    """plan[n, l] (int8): the stage symbol n has reached after layer l (after the last: the exact
    stage, `len(ladder(R))`).

    An increment's layer is ⌊B·L / total⌋, B the bits of the increments before it in the order
    (key descending, then symbol, then stage): B = (bits of every larger key) + (bits of its own
    key earlier in symbol order). The first term comes from a table of bits per key; the second
    is needed only for the few keys whose increments straddle a layer boundary, so no step-wide
    sort of all increments is made (each group keeps its increments compactly between the passes).
    """
    if n_layers < 1:
        raise ValueError(f"the number of layers must be at least 1, got {n_layers}")
    groups = _groups(model) if groups is None else groups
    found = [_increments(*_stage_costs(g)) for g in groups]
    keys, per_key = _bits_per_key([(key, cost) for _, _, key, cost in found])
    total = int(per_key.sum().clamp_min(1))
    above = per_key.flip(0).cumsum(0).flip(0) - per_key  # bits of the larger keys
    first, last = (above * n_layers) // total, ((above + per_key - 1) * n_layers) // total
    earlier = _earlier_bits_of_own_key(groups, found, keys[first != last])
    reached = torch.empty(len(model), n_layers, dtype=torch.int8)
    for n, (g, (row, stage, key, _)) in enumerate(zip(groups, found)):
        before = above[torch.searchsorted(keys, key)]
        if n in earlier:
            before[earlier[n][0]] += earlier[n][1]
        mine = torch.zeros(len(g.index) * n_layers, dtype=torch.long)
        mine.scatter_reduce_(0, row.long() * n_layers + (before * n_layers) // total, stage.long(), "amax")
        mine = torch.cummax(mine.view(len(g.index), n_layers), 1).values
        mine[:, -1] = g.stages
        reached[g.index] = mine.to(torch.int8)
    return reached


def _bits_per_key(found: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The distinct keys (ascending) of all increments, and the bits of each key's increments."""
    distinct, sums = [], []
    for key, cost in found:
        k, at = torch.unique(key, return_inverse=True)
        distinct.append(k), sums.append(torch.zeros(len(k), dtype=torch.long).index_add_(0, at, cost.long()))
    keys, at = torch.unique(torch.cat(distinct), return_inverse=True)
    return keys, torch.zeros(len(keys), dtype=torch.long).index_add_(0, at, torch.cat(sums))


def _earlier_bits_of_own_key(groups: list[_Group], found: list, straddling: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
    """For the increments whose key is in `straddling`: the bits of the increments of the same key
    that come earlier by (symbol, stage), as {group: (positions in its increments, bits)}."""
    if not len(straddling):
        return {}
    parts = []  # (group, position in the group's increments, symbol, stage, key, bits)
    for n, (g, (row, stage, key, cost)) in enumerate(zip(groups, found)):
        at = torch.nonzero(torch.isin(key, straddling)).squeeze(1)
        parts.append((torch.full_like(at, n), at, g.index[row[at].long()], stage[at].long(), key[at].long(), cost[at].long()))
    group, at, symbol, stage, key, cost = map(torch.cat, zip(*parts))
    order = torch.argsort(symbol * (int(stage.max()) + 1) + stage)
    order = order[torch.sort(key[order], stable=True).indices]  # by key, then (symbol, stage)
    group, at, key, cost = group[order], at[order], key[order], cost[order]
    earlier = torch.cumsum(cost, 0) - cost
    earlier -= earlier[torch.searchsorted(key, key)]  # from each key's first increment
    return {n: (at[group == n], earlier[group == n]) for n in torch.unique(group).tolist()}


@dataclass
class _Rows:
    """The symbols `rows` (within group `g`) that a layer advances to stage `target`, and their
    candidate cells, the stage-`target` cells inside their known cell: `count` of them, the c-th
    spanning the table entries first[:, c] … last[:, c] (padded with the last entry; int16, as
    entries are at most 2R, so that a layer's candidates of a whole image stay small)."""

    g: _Group
    rows: Tensor
    target: Tensor
    count: Tensor
    first: Tensor
    last: Tensor

    def exact_ends(self) -> Tensor:
        """(rows × 2) whether the first (last) candidate is the table's low (high) tail entry at the exact stage."""
        exact = self.target == self.g.stages
        last = self.last.gather(1, (self.count - 1)[:, None]).squeeze(1)
        return torch.stack([exact & (self.first[:, 0] == 0), exact & (last == 2 * self.g.r)], 1)


class Refinement:
    """One step of one image, layer by layer: the tables of the next layer (`layer`), the
    encoder's values (`values`), what both sides learn from them (`receive`) and the estimate of
    the step's indices so far (`fill`). Encoder and decoder call the same methods in the same order."""

    def __init__(self, model: StepModel, n_layers: int):
        self.model, self.n_layers = model, n_layers
        self.groups = _groups(model)
        self.plan = plan(model, n_layers, self.groups)
        n = len(model)
        self.stage = torch.zeros(n, dtype=torch.int8)
        self.lo = torch.zeros(n, dtype=torch.int32)  # the known cell: entries lo … hi of the symbol's table
        self.hi = (2 * model.ranges).to(torch.int32)
        self.excess = torch.zeros(n, dtype=torch.long)  # of the symbols now exact
        self.exact = self.plan[:, -1]
        # of each known cell under the unquantised prior (for ideal bits: when the model has its std)
        self.log_mass = None if model.std is None else torch.zeros(n, dtype=torch.float64)
        self.layer_index = 0
        self._next: list[_Rows] | None = None

    def _rows(self) -> list[_Rows]:
        if self._next is None:
            self._next = [self._group_rows(g) for g in self.groups]
        return self._next

    def _group_rows(self, g: _Group) -> _Rows:
        target = self.plan[g.index, self.layer_index].long()
        rows = torch.nonzero(target > self.stage[g.index]).squeeze(1)
        lo, hi = self.lo[g.index[rows], None].long(), self.hi[g.index[rows], None].long()
        bound = g.bounds(g.x(rows))[target[rows], torch.arange(len(rows))]  # rows × 2r: at the target stage
        cell = _cells(bound)  # the known cell spans lo … hi
        c_lo = cell.gather(1, lo)
        count = (cell.gather(1, hi) - c_lo).squeeze(1) + 1
        width = max(int(count.max()), 1) if len(rows) else 1
        c = torch.arange(width)[None, :]
        ids = c_lo + c  # the candidates' cells
        valid = c < count[:, None]
        first = torch.where(valid, torch.searchsorted(cell, ids), hi)
        last = torch.where(valid, torch.searchsorted(cell, ids, right=True) - 1, hi)
        return _Rows(g, rows, target[rows].to(torch.int8), count, first.to(torch.int16), last.to(torch.int16))

    def layer(self) -> "LayerModel":
        """The entropy model of the next layer's values."""
        return LayerModel(self._rows())

    def values(self, k: Tensor) -> Tensor:
        """The encoder's values of the next layer: the index of k's cell among the candidates, plus
        k's excess beyond the table's end for a symbol that reaches k itself in a tail."""
        out = [torch.zeros(0, dtype=torch.long)]
        for part in self._rows():
            r = part.g.r
            kk = k[part.g.index[part.rows]].long()
            entry = kk.clamp(-r, r) + r
            valid = torch.arange(part.first.shape[1])[None, :] < part.count[:, None]
            cand = (valid & (part.first <= entry[:, None])).sum(1) - 1
            out.append(cand + (kk - kk.clamp(-r, r)))
        return torch.cat(out)

    def receive(self, values: Tensor, bits: bool = True) -> float | None:
        """Narrow the known cells by the layer's values. With `bits` (then at every layer), returns
        the layer's ideal bits: −log₂ P(new cell | old cell) summed under the unquantised prior
        (the model's `std`), a cell standing for its interval of x (±inf at the tails; k's own
        interval once k is exact)."""
        if bits and self.log_mass is None:
            raise ValueError("ideal bits need the prior's unrounded std: make the step's model with ideal=True")
        total, at = 0.0, 0
        for part in self._rows():
            v = values[at: at + len(part.rows)]
            at += len(part.rows)
            cand = torch.minimum(v.clamp_min(0), part.count - 1)
            n = part.g.index[part.rows]
            lo, hi = (part.first.gather(1, cand[:, None]).squeeze(1).long(),
                      part.last.gather(1, cand[:, None]).squeeze(1).long())
            exact = part.target == part.g.stages
            excess = torch.where(exact, v - cand, 0)
            self.lo[n], self.hi[n], self.excess[n] = lo.to(torch.int32), hi.to(torch.int32), excess
            if bits:
                log_mass = interval_log_mass(self.model.std[n], *_interval(part.g, part.rows, lo, hi, excess, exact),
                                             self.model.prior_type)
                total += float((self.log_mass[n] - log_mass).sum())
                self.log_mass[n] = log_mass
        self.stage = self.plan[:, self.layer_index].clone()
        self.layer_index += 1
        self._next = None
        return total / math.log(2) if bits else None

    def fill(self) -> Tensor:
        """The step's indices as far as known: k where exact, else u + E[x | cell] under P (float64)."""
        if torch.equal(self.stage, self.exact):
            return (self.lo - self.model.ranges + self.excess).double()
        k = torch.empty(len(self.model), dtype=torch.float64)
        for g in self.groups:
            lo, hi = self.lo[g.index, None].long(), self.hi[g.index, None].long()
            e = torch.arange(2 * g.r + 1)[None, :]
            x = g.x()
            P = torch.diff(g.cdf(x=x), dim=1) * ((e >= lo) & (e <= hi))
            mean = (P * x).sum(1) / P.sum(1).clamp_min(1e-300)
            known = (lo.squeeze(1) - g.r + self.excess[g.index]).double()
            k[g.index] = torch.where(self.stage[g.index] == g.stages, known, mean + self.model.u[g.index])
        return k


def _interval(g: _Group, rows: Tensor, lo: Tensor, hi: Tensor, excess: Tensor, exact: Tensor) -> tuple[Tensor, Tensor]:
    """The interval of x = k − u (in Δ) of the cells lo … hi of `rows`; ±inf at a tail entry; k's
    own interval where `exact`."""
    x = g.x(rows)
    at_lo, at_hi = x.gather(1, lo[:, None]).squeeze(1), x.gather(1, hi[:, None]).squeeze(1)
    left = torch.where(lo == 0, -torch.inf, at_lo - 0.5)
    right = torch.where(hi == 2 * g.r, torch.inf, at_hi + 0.5)
    return torch.where(exact, at_lo + excess - 0.5, left), torch.where(exact, at_lo + excess + 0.5, right)


class LayerModel:
    """The tables of one refinement layer: per coded symbol, the masses of its candidate cells,
    differences of the table's CDF. A candidate that is a table's end entry at the exact stage is
    open (its value carries the excess, as `StepModel`'s end entries do). A symbol with one
    candidate is not coded, unless that candidate is open. Rows are coded group by group
    (`_groups`' order), by number of candidates (ascending) within a group, in symbol order
    within those."""

    open_ends = True

    def __init__(self, parts: list[_Rows]):
        self.parts = parts
        self.n = sum(len(p.rows) for p in parts)

    def __len__(self) -> int:
        return self.n

    def segments(self) -> Iterator[Segment]:
        offset = 0
        for p in self.parts:
            C = p.g.cdf(p.rows)
            valid = torch.arange(p.first.shape[1])[None, :] < p.count[:, None]
            mass = torch.where(valid, C.gather(1, p.last.long() + 1) - C.gather(1, p.first.long()), 0.0)
            opens = p.exact_ends()
            for w in torch.unique(p.count).tolist():
                rows = torch.nonzero(p.count == w).squeeze(1)
                if w > 1:
                    yield Segment(rows + offset, 0, mass[rows, :w].contiguous().numpy(), opens[rows])
                    continue
                # one candidate: only an open end carries information (its excess), coded as the
                # end of a two-entry table
                for side, low, table in ((0, 0, (1.0, 0.0)), (1, -1, (0.0, 1.0))):
                    keep = rows[opens[rows, side]]
                    if len(keep):
                        yield Segment(keep + offset, low, torch.tensor([table]).repeat(len(keep), 1).numpy(), opens[keep])
            offset += len(p.rows)
