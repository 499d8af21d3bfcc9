"""How far pixreg is from the authors' released RCH and CAR code, and what each released detail changes.

Every number is a difference between two computations on identical float64 inputs
(random embeddings/features, blocky random labels with ignored pixels), over several
seeds; the table gives the range over seeds. Two kinds of rows:

* "option": a released-code detail that pixreg reproduces with a keyword (recipe in
  docs/recipes.md); the row says how much the loss or gradient changes when the detail
  is switched, i.e. what a comparison would be off by without it.
* "remaining": a difference that remains with the recipe; the row measures it by
  simulating the released behaviour (e.g. per-GPU reductions) in one process.

Usage: python benchmarks/released_gaps.py [--seeds 5] [--out benchmarks/results/released_gaps]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _machine import machine  # noqa: E402

from pixreg.losses import resize_labels  # noqa: E402
from pixreg.losses.car import car_loss  # noqa: E402
from pixreg.losses.rch import rch_loss, rch_update_prototypes  # noqa: E402

DT = torch.float64
IGN = 255
K = 6


# ----------------------------------------------------------------------------- inputs


def blocky_labels(g: torch.Generator, b: int, size: int, k: int, block: int, ignore: float = 0.1) -> torch.Tensor:
    """Piecewise-constant labels (random classes on ``block x block`` tiles), some tiles ignored."""
    n = -(-size // block)
    tiles = torch.randint(0, k, (b, n, n), generator=g)
    tiles[torch.rand(b, n, n, generator=g) < ignore] = IGN
    return tiles.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :size, :size]


def rch_inputs(seed: int, b: int = 2, e_dim: int = 16, h: int = 16, label_scale: int = 2):
    g = torch.Generator().manual_seed(seed)
    y = blocky_labels(g, b, h * label_scale, K, 3 * label_scale)
    e = torch.randn(b, e_dim, h, h, generator=g, dtype=DT)
    # logits that agree with the labels on most pixels (a partly trained head), at embedding resolution
    y_small = y[:, ::label_scale, ::label_scale]
    z = torch.randn(b, K, h, h, generator=g, dtype=DT)
    z = z + 2.5 * F.one_hot(y_small.clamp(max=K - 1), K).permute(0, 3, 1, 2).to(DT)
    protos = torch.randn(K, e_dim, generator=g, dtype=DT)
    return e, z, y, protos


RECIPE = dict(calibration="cosine_to_mean", sets="image", ce_resolution="label", reduction="all_pixels")


def _grad(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(fn(x), x)
    return g


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def _recipe_loss(e, z, y, protos, init, *, grad=True, **kw):
    """Loss of the RCH recipe with this step's update (``prototype_update="after"``)."""
    opts = dict(RECIPE, **kw)
    new, ini = rch_update_prototypes(e, z, y, protos, init, differentiable=grad)
    return rch_loss(e, z, y, new, ini, prototype_grad=grad, **opts).loss


# ------------------------------------------------------------------------- RCH rows


def rch_update_order(seed: int) -> float:
    e, z, y, protos = rch_inputs(seed)
    init = torch.ones(K, dtype=torch.bool)
    after = _recipe_loss(e, z, y, protos, init, grad=False)
    before = rch_loss(e, z, y, protos, init, **RECIPE).loss
    return abs(float(after - before))


def rch_hard_weight(seed: int) -> float:
    e, z, y, protos = rch_inputs(seed)
    init = torch.ones(K, dtype=torch.bool)
    one = _recipe_loss(e, z, y, protos, init, grad=False)
    half = _recipe_loss(e, z, y, protos, init, grad=False, hard_weight=0.5)
    return abs(float(one - half))


def rch_prototype_grad(seed: int) -> float:
    e, z, y, protos = rch_inputs(seed)
    init = torch.ones(K, dtype=torch.bool)
    with_grad = _grad(lambda x: _recipe_loss(x, z, y, protos, init, grad=True), e)
    const = _grad(lambda x: _recipe_loss(x, z, y, protos, init, grad=False), e)
    return _rel(with_grad, const)


def rch_label_resolution(seed: int) -> float:
    e, z, y, protos = rch_inputs(seed)
    init = torch.ones(K, dtype=torch.bool)
    label = _recipe_loss(e, z, y, protos, init, grad=False)
    emb = _recipe_loss(e, z, y, protos, init, grad=False, ce_resolution="embedding")
    return abs(float(label - emb))


def rch_ohem(seed: int) -> float:
    e, z, y, protos = rch_inputs(seed)
    init = torch.ones(K, dtype=torch.bool)
    ohem = _recipe_loss(e, z, y, protos, init, grad=False, ohem_thresh=0.2, ohem_min_kept=100)
    plain = _recipe_loss(e, z, y, protos, init, grad=False)
    return abs(float(ohem - plain)) / float(plain)


def rch_reduction(seed: int) -> float:
    e, z, y, protos = rch_inputs(seed)
    init = torch.ones(K, dtype=torch.bool)
    allpx = _recipe_loss(e, z, y, protos, init, grad=False)
    anchors = _recipe_loss(e, z, y, protos, init, grad=False, reduction="anchors")
    return abs(float(allpx - anchors)) / float(anchors)


def rch_upsampled_logits(seed: int) -> float:
    """Remaining if the model only exposes logits upsampled to the labels (8x): pixreg
    brings them back to the embedding resolution bilinearly; released uses the head's own."""
    e, z, y, protos = rch_inputs(seed, label_scale=8)
    init = torch.ones(K, dtype=torch.bool)
    native = _recipe_loss(e, z, y, protos, init, grad=False)
    up = F.interpolate(z, size=y.shape[-2:], mode="bilinear", align_corners=False)
    via_up = _recipe_loss(e, up, y, protos, init, grad=False)
    return abs(float(native - via_up)) / float(native)


def rch_ddp_prototype_gradient(seed: int, world: int) -> float:
    """Remaining under DDP with prototype_grad: the released code all-reduces the TP sums
    without autograd, so a rank's loss reaches only its own pixels' share of the TP mean.
    Simulated in one process, one image per rank; relative gradient difference."""
    e, z, y, protos = rch_inputs(seed, b=world)
    init = torch.ones(K, dtype=torch.bool)

    def released(x: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(())
        for r in range(world):
            mixed = torch.cat([x[q:q + 1] if q == r else x[q:q + 1].detach() for q in range(world)])
            new, ini = rch_update_prototypes(mixed, z, y, protos, init, differentiable=True)
            total = total + rch_loss(x[r:r + 1], z[r:r + 1], y[r:r + 1], new, ini, prototype_grad=True,
                                     **RECIPE).loss
        return total / world

    g_rel = _grad(released, e)
    g_pix = _grad(lambda x: _recipe_loss(x, z, y, protos, init, grad=True), e)
    return _rel(g_rel, g_pix)


def rch_initial_prototypes(seed: int, step: int) -> float:
    """Remaining unless the recipe's random start is used: empty state (first sighting)
    vs a random buffer, relative loss difference after ``step`` updates on the same stream."""
    g = torch.Generator().manual_seed(1000 + seed)
    random_state = torch.randn(K, 16, generator=g, dtype=DT)
    states = {"random": (random_state, torch.ones(K, dtype=torch.bool)),
              "empty": (torch.zeros(K, 16, dtype=DT), torch.zeros(K, dtype=torch.bool))}
    losses = {}
    for s in range(step):
        e, z, y, _ = rch_inputs(seed * 100 + s)
        for name, (p, i) in states.items():
            p, i = rch_update_prototypes(e, z, y, p, i)
            states[name] = (p, i)
            losses[name] = rch_loss(e, z, y, p, i, **RECIPE).loss
    return abs(float(losses["random"] - losses["empty"])) / float(losses["random"])


# ------------------------------------------------------------------------- CAR rows


def car_inputs(seed: int, b: int = 8, d: int = 16, h: int = 17, label_size: int = 129, k: int = K):
    g = torch.Generator().manual_seed(seed)
    y = blocky_labels(g, b, label_size, k, 12)
    x = torch.randn(b, d, h, h, generator=g, dtype=DT)
    return x, y


def car_label_sampling(seed: int) -> float:
    x, y = car_inputs(seed)
    tf = car_loss(x, y, K, variant="released").loss
    torch_rule = car_loss(x, y, K, variant="released", label_sampling="torch").loss
    return abs(float(tf - torch_rule)) / float(tf)


def car_per_replica_squares(seed: int, world: int, term: str) -> float:
    """Remaining: the released code squares each replica's mean (intra, inter-c2p) and
    DDP averages; pixreg squares the global mean. Centres are global in both."""
    x, y = car_inputs(seed, b=world)
    glob = car_loss(x, y, K, variant="released")
    per = [_replica_mean(x, y, r, term) for r in range(world)]  # global centres, replica's own mean
    released = sum(m * m for m in per) / world
    pix = float(glob.terms[term])
    return abs(released - pix) / pix


def _replica_mean(x: torch.Tensor, y: torch.Tensor, r: int, term: str) -> float:
    """sqrt of the term computed on replica r's image with the global batch's centres (EMA path:
    centres passed as a fixed buffer, so the image's own pixels do not redefine them)."""
    b, d = x.shape[:2]
    flat = x.permute(0, 2, 3, 1).reshape(-1, d)
    lab = resize_labels(y, tuple(x.shape[-2:]), "align_corners").reshape(-1)
    dl = torch.where(lab == IGN, torch.full_like(lab, K), lab)  # ignored -> dump row K
    sums = torch.zeros(K + 1, d, dtype=DT).index_add(0, dl, flat)[:K]
    counts = torch.bincount(dl, minlength=K + 1)[:K].to(DT)
    centres = sums / counts.clamp(min=1)[:, None]
    weights = {"intra_c2p": 0.0, "inter_c2c": 0.0, "inter_c2p": 0.0}
    weights[term] = 1.0
    out = car_loss(x[r:r + 1], y[r:r + 1], K, variant="released", ema_centres=centres.clone(), ema_update=False,
                   intra_weight=weights["intra_c2p"], c2c_weight=weights["inter_c2c"],
                   c2p_weight=weights["inter_c2p"])
    return float(out.terms[term]) ** 0.5


def car_per_replica_intra_check(seed: int) -> float:
    """Self-check of the simulation: with one replica it reproduces pixreg's global value."""
    x, y = car_inputs(seed, b=1)
    return abs(_replica_mean(x, y, 0, "inter_c2p") ** 2 - float(car_loss(x, y, K, variant="released")
                                                                .terms["inter_c2p"]))


# ---------------------------------------------------------------------------- table


_KEYS = ("method", "kind", "what", "metric", "fn")
ROWS: List[Dict] = [dict(zip(_KEYS, r)) for r in [
    ("RCH", "option", "prototype_update: 'before' instead of 'after' (released)", "abs. loss diff", rch_update_order),
    ("RCH", "option", "hard_weight 0.5 instead of 1 (released alp/tmp)", "abs. loss diff", rch_hard_weight),
    ("RCH", "option", "prototype_grad off (paper) vs on (released)", "rel. grad diff", rch_prototype_grad),
    ("RCH", "option", "CE at embedding instead of label resolution (labels 2x)", "abs. loss diff", rch_label_resolution),
    ("RCH", "option", "OHEM (thresh 0.2, min_kept 100 per image) on vs off", "rel. loss diff", rch_ohem),
    ("RCH", "option", "reduction 'anchors' instead of 'all_pixels' (10% ignored)", "rel. loss diff", rch_reduction),
    ("RCH", "remaining", "logits passed upsampled 8x instead of at feature resolution", "rel. loss diff",
     rch_upsampled_logits),
    *[("RCH", "remaining", f"DDP, {w} GPUs x 1 image: TP-sum all-reduce without autograd", "rel. grad diff",
       (lambda s, w=w: rch_ddp_prototype_gradient(s, w))) for w in (2, 4, 8)],
    *[("RCH", "remaining", f"empty instead of random initial prototypes, after {n} steps", "rel. loss diff",
       (lambda s, n=n: rch_initial_prototypes(s, n))) for n in (1, 10, 30, 100)],
    ("CAR", "option", "labels: torch nearest instead of TF align_corners (129 -> 17)", "rel. loss diff",
     car_label_sampling),
    *[("CAR", "remaining", f"DDP, {w} replicas x 1 image: square of per-replica {t} means", "rel. term diff",
       (lambda s, w=w, t=t: car_per_replica_squares(s, w, t))) for t in ("intra_c2p", "inter_c2p") for w in (2, 8)],
]]


def measure(seeds: int) -> List[Dict]:
    out = []
    for row in ROWS:
        vals = [row["fn"](s) for s in range(seeds)]
        out.append({k: v for k, v in row.items() if k != "fn"} | {"min": min(vals), "max": max(vals),
                                                                   "values": vals})
    return out


def to_markdown(rows: List[Dict], command: str) -> str:
    lines = [
        "# Released-code gaps (RCH, CAR)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}, torch {torch.__version__}, Python {platform.python_version()}  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Seeds: {len(rows[0]['values'])}; float64; range over seeds.",
        "",
        "| method | kind | what differs | metric | min | max |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['kind']} | {r['what']} | {r['metric']} | {r['min']:.2e} | {r['max']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "released_gaps"),
                   help="output path without extension (.md and .json are written)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.seeds)
    command = "python benchmarks/released_gaps.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = to_markdown(rows, command.strip())
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as fh:
        fh.write(md)
    with open(args.out + ".json", "w") as fh:
        json.dump({"command": command.strip(), "machine": machine(), "rows": rows}, fh, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
