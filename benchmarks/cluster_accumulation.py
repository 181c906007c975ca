"""How much it matters whether the sliding clusters move once per micro-batch or once per
optimizer step under gradient accumulation (docs/method.md §2, "Sliding update").

One SlimLinear (K = 64, 16 clusters, momentum 0.1) sees the same stream of in-domain tokens
(a drifting 8-component Gaussian mixture, 200 optimizer steps of 256 tokens) three ways:

* ``step``: one forward of 256 tokens per step, then the step;
* ``micro4`` / ``micro16`` with ``move=step``: the same 256 tokens as 4 / 16 micro-batches
  (gradient accumulation), the clusters moving once at the step (what the layer does);
* the same with ``move=micro``: the clusters moving after every micro-batch (the
  alternative: ``step_clusters`` after each forward).

The first batch initialises the clusters whole in every arm, so the arms differ only in how
the EMA steps come. After the stream, each arm routes the same held-out tokens (in-domain,
and shifted out of domain) with its clusters. Reported: the relative distance between its
centres and the ``step`` arm's, the mean d, the mean |d - d_step| and the share of tokens
whose sign of d (in or out of
domain) differs from ``step``'s, separately for the in-domain and the shifted tokens. Writes ``benchmarks/results/cluster_accumulation.csv``.

    python benchmarks/cluster_accumulation.py
"""
from __future__ import annotations

import os

import torch
from torch import nn

import slim_kernels as sk
from slim_kernels.bench.reporting import write_csv
from slim_kernels.provenance import provenance_string

K, C, STEPS, BATCH = 64, 16, 200, 256


def stream(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(8, K, generator=g) * 2.0
    drift = torch.randn(8, K, generator=g) * 0.002
    for s in range(STEPS):
        comp = torch.randint(0, 8, (BATCH,), generator=g)
        yield means[comp] + s * drift[comp] + torch.randn(BATCH, K, generator=g)


def held_out(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(8, K, generator=torch.Generator().manual_seed(0)) * 2.0
    comp = torch.randint(0, 8, (512,), generator=g)
    drift = torch.randn(8, K, generator=torch.Generator().manual_seed(0)) * 0.002
    inside = means[comp] + STEPS * drift[comp] + torch.randn(512, K, generator=g)
    outside = torch.randn(512, K, generator=g) * 3.0 + 4.0
    return torch.cat([inside, outside])


def run(micro: int, seed: int, per_micro: bool):
    torch.manual_seed(seed)
    layer = sk.SlimLinear.from_linear(nn.Linear(K, K), sk.SlimConfig(num_clusters=C)).train()
    with torch.no_grad():
        for s, batch in enumerate(stream(seed)):
            # the first batch initialises the clusters, whole, in every arm: the arms differ
            # only in how the EMA steps come
            for part in (batch,) if s == 0 else batch.chunk(micro):
                layer(part)
                if per_micro:
                    sk.step_clusters(layer)
            sk.step_clusters(layer)
    layer.eval()
    x = held_out()
    with torch.no_grad(), sk.track_routing(layer):
        layer(x)
    c = layer.clusters
    inv = (c.cluster_vars + 1e-5).rsqrt()
    d = ((x[:, None, :] - c.cluster_centers[None]).abs() * inv[None]).square().mean(-1).sqrt()
    assign = ((x[:, None, :] - c.cluster_centers[None]) ** 2).sum(-1).argmin(1)
    return c.cluster_centers.clone(), d.gather(1, assign[:, None]).squeeze(1) - 1.0


def main() -> None:
    rows = []
    for seed in (0, 1, 2):
        ref_c, ref_d = run(1, seed, False)
        for micro, per_micro in ((4, False), (16, False), (4, True), (16, True)):
            cen, d = run(micro, seed, per_micro)
            row = dict(seed=seed, micro_batches=micro, move="micro" if per_micro else "step",
                       centre_rel_diff=round(float((cen - ref_c).norm() / ref_c.norm()), 4))
            for half, sl in (("in", slice(0, 512)), ("out", slice(512, None))):
                row[f"d_step_{half}"] = round(float(ref_d[sl].mean()), 4)
                row[f"d_micro_{half}"] = round(float(d[sl].mean()), 4)
                row[f"mean_abs_d_diff_{half}"] = round(float((d[sl] - ref_d[sl]).abs().mean()), 4)
                row[f"sign_flips_{half}"] = round(float(((d[sl] > 0) != (ref_d[sl] > 0))
                                                        .float().mean()), 4)
            row["provenance"] = provenance_string()
            rows.append(row)
            print({k: v for k, v in rows[-1].items() if k != "provenance"})
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "cluster_accumulation.csv")
    write_csv(rows, out, columns=list(rows[0]))
    print("wrote", out)


if __name__ == "__main__":
    main()
