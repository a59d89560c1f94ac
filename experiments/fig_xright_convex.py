"""Figure: XRIGHT's convex theory beside the miniature's measured gaps (issue 13's last XRIGHT item).

`theory/forgetting.py` analyses SFT and DPO on a log-linear policy; `experiments/fig_xright.py` measures them
on the tiny transformer. This module builds a log-linear instance from the same data and the same base model,
runs the same schedules on it with the same protocol, and asks whether the theory's instance predicts the
miniature's ranking of the methods. The instance and the rule below are ours; nothing here is the paper's.

The instance (built, not fitted to any outcome: no quantity below is chosen by looking at a result).
- Contexts: every prompt of the miniature's training sets, `sft_terse.jsonl` (1024) and `dpo.jsonl` (1024),
  and of its held-out sets, `test_terse.jsonl` and `test_pref.jsonl` (256 each). Responses: two per prompt,
  the terse answer and the worked solution (`toy.world.terse`, `toy.world.worked_of`): the two styles the
  objectives fight over.
- Policy: the first-order model of the base around its weights w0, restricted to a random subspace and to the
  two responses: log pi(y|x) = c log p0(y|x) + sum_k theta_k g_k(x, y) - log Z(x), with p0 the base's likelihood
  of the whole completion (the trainer's token layout: prompt + completion + eos, max_length 96) and
  g_k(x, y) = d/de log p0_{w0 + e r_k}(y|x) at e = 0, the derivative along the k-th of d = 16 random directions
  r_k (i.i.d. Gaussian over every parameter, seed 0, scaled to unit norm). So features
  phi(x, y) = (g_1, ..., g_16, log p0) and theta_ref = (0, ..., 0, 1): the reference is the base,
  renormalised over the two responses, and training starts there (theta_0 = theta_ref).
- Objectives (`theory.forgetting.LogLinearProblem`): S uniform over (SFT prompt, terse answer), P uniform over
  (DPO prompt, worked, terse), beta = the miniature's DPO beta (0.1). Held out: the same construction on the
  test prompts, evaluated at the trained theta.

The runs on the instance mirror `fig_xright`'s protocol. 200 steps with minibatches of 16 examples and/or 16
pairs (`theory.forgetting.run_schedule`), seeds 1, 2, 3 (the minibatch stream and ALRIGHT's draws). The
schedules are the objects the trainer runs (`theory.schedules`): Sequential SFT->DPO with stages
((1 - lam) 200, lam 200), Sequential DPO->SFT (lam 200, (1 - lam) 200), Mix, ALRIGHT, MAXRIGHT k = 1 and
k = 10, at lam in {0.25, 0.5, 0.75}. One constant step for every method, fixed in advance by the theory rather
than tuned: eta = 1 / (2 max(L_sft, L_dpo)) (`LogLinearProblem.constants`), the largest step that both
Theorem 1 (eta <= 2 / L) and Theorem 2 (eta <= 1 / (2 L_lam), every lam) allow. MAXRIGHT's f* are the
instance's own single-objective runs of the same budget on seed 0, evaluated on the training sets, as the
miniature took its f* from seed-0 runs. The ideal point of seed s: the held-out values of the single-objective
runs (Mix at lam 0 and lam 1) of seed s; ideal distance = the Euclidean norm of the two held-out gaps at step
200, as in `fig_xright`.

Beside the runs, what the theorems certify on the instance (reported, not graded):
- whether each f_lam attains its minimum (`finite_minimiser`, lam in {0, 0.25, 0.5, 0.75, 1});
- Theorem 1 (sequential's certified gap to f*_lam, every split and budget) where both single-objective
  minima exist: it needs them, and says so otherwise;
- Theorem 2 (ALRIGHT's rate): its bound on E f_lam(averaged iterate) - f*_lam at eta and T = 200, beside the
  realised value of the three seeds, where the minimum of f_lam exists.

The measured side: the per-seed held-out ideal distances that `xright_tradeoff` records in
`<out>/meta/xright_tradeoff.json` (so build that figure first; `ptlab figures` does, as this module sorts
after `fig_xright`).

Verdict rule xright_convex, written and committed before the instance was built or run: with the mean ideal
distance over seeds 1-3 of each (method, lam) cell, for the six methods and three lam,
(A) at two or more of the three lam, the method with the lowest mean ideal distance on the instance is among
    the two lowest measured at that lam;
(B) the Spearman rank correlation between instance and measured mean ideal distances over the 18 cells is at
    least 0.5.
held = yes if A and B hold, partly if one, no if neither ("held" here: the convex instance predicts the
miniature's ranking).
"""
