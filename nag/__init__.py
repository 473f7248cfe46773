"""Searching kernel spaces with learned help: performance predictors, a predictor-guided graph
diffusion generator (DiffusionNAG-style), and the search loop; proven on NAS-Bench-201 first,
then run on the U-Net's kernels.

- `nag.predictors` (+ `predictor_net`): the predictor interface, the noise-aware ensembled graph
  transformer, the zero-cost-proxy prior; `nag.sotl`: SoTL-E from vmapped short trainings.
- `nag.generator`: the score-based graph diffusion generator with predictor guidance.
- `nag.search`: the checkpointed, resumable search loop; `nag.nb201`: the NB201 table as a
  counted-evaluation oracle, random search and regularised evolution; `nag.guided` and
  `nag.nb201_generator`: the predictor-guided and generator-based ("ours") NB201 searchers.
- `nag.kernel_search` + `nag.main`: the kernel search on the U-Net's placeholders.
"""
