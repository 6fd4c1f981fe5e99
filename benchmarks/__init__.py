"""The pyroflows benchmark suite:
``python -m benchmarks {all,vi,guides,svi,image,residual,scaling,sampling,applications} [--quick]``.

Parts (each also runs standalone as ``python benchmarks/<script>.py``):

* ``vi``: variational inference on the 2-D energies of Rezende & Mohamed (``vi_energies.py``), and flow guides
  against Pyro's autoguides at equal budget, KL(q‖p) on six posteriors with an exact log Z, Pyro's hand-written
  SVI loop against :func:`pyroflows.infer.fit`'s defaults (``vi_guides.py``), and the same on three held-out
  posteriors that chose nothing (``vi_heldout.py``; ``guides`` runs these two alone);
* ``svi``: the SVI step of :class:`pyroflows.AutoFlow` against the same flow in Pyro's ``AutoNormalizingFlow``,
  interleaved, on the example models, through ``pyro.infer.SVI`` and through :func:`pyroflows.infer.fit`
  (``svi_step.py``); what the sticking-the-landing gradient costs per step against ``Trace_ELBO``, flow by flow,
  and what the autoregressive layers' warm-started inverse saves (``stl_cost.py``); the optimiser's update, torch's
  default loop and ``foreach`` against the fused one both trainers use (``optimizer_step.py``); a step of
  :class:`pyroflows.AutoFlowMixture` against one flow, and with components given weight zero
  (``mixture_step.py``);
* ``image``: Glow and RealNVP on 8x8 digits against normflows (``image_flows.py``);
* ``residual``: residual flows against normflows, memory against series length, 2-D toys (``residual.py``); test
  bits/dim of 1000 28x28 images with its standard error, time and memory per evaluation setting
  (``residual_eval.py``);
* ``scaling``: ms/step and peak memory of every layer family as the size grows, scaling exponents (``scaling.py``);
* ``sampling``: samples/s of every builder, the residual flow's fixed-point inverse included (``sampling.py``);
* ``applications``: hybrid models (flow + classifier) at lam = 0, 1/D, 1 against a plain classifier
  (``hybrid.py``), and out-of-distribution / open-set detection on the digits (``ood.py``).

Standalone only: ``exact_logdet.py`` times the exact residual log-det's two methods on one device (its figures
decide ``exact_log_det(method="auto")``; run it on a GPU machine); ``khat_noise.py`` measures how much of a
guide's PSIS k̂ in the guide benchmarks is the draws' noise (one trained guide, k̂ from many disjoint draw sets);
``neutra.py`` runs NUTS on a model and in a fitted flow guide's base space (:meth:`pyroflows.AutoFlow.neutra_reparam`).

Each run writes ``benchmarks/results/<name>.json`` (``<name>_quick.json`` with ``--quick``) and regenerates
``benchmarks/RESULTS.md`` (:mod:`benchmarks.report`). The peers other than Pyro come with the ``bench`` extra
(``pip install -e ".[bench]"``: normflows); a part whose peer is missing skips it with a note.
"""

PARTS = ("vi", "svi", "image", "residual", "scaling", "sampling", "applications")
