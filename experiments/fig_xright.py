"""Figures: XRIGHT's LLM-level findings in miniature (docs/xright.md sections 5 and 7), on the tiny world.

The conflict. SFT data: `sft_terse.jsonl`, terse answers ("The answer is \\boxed{32}.") of 1024 train problems
of levels 1-4; preference data: `dpo.jsonl`, 1024 pairs on other train problems, chosen = the worked
solution, rejected = the terse answer (both right). The reference is the base model. SFT pulls towards terse
answers, DPO away from them: the two objectives conflict, as XRIGHT's SFT and preference sets do. Held out:
f_SFT on `test_terse.jsonl`, f_DPO on `test_pref.jsonl` (256 test problems each, never trained on).

The runs (seeds 1, 2, 3; `experiments/sweeps/xright_set.yaml`, run by `ptlab sweep`): 200 optimizer steps,
16 SFT examples and / or 16 preference pairs per step, a constant rate without warm-up (the released code's
schedule), from the base. Methods (`method.joint.schedule`):
- Sequential SFT->DPO: (T_SFT, T_DPO) = ((1 - lam) 200, lam 200), the pairing of the paper's Llama table;
- Sequential DPO->SFT: (T_DPO, T_SFT) = (lam 200, (1 - lam) 200), the pairing of its Pythia figure; both
  reset the optimizer between the stages (the released code's stages are separate processes);
- Mix, ALRIGHT, MAXRIGHT with k = 1 and with the released code's k = 10;
at lam (the DPO weight) in {0.25, 0.5, 0.75}, the Llama grid (the Pythia grid's 0.01 and 0.99 are left out
for time). The refresh-interval ablation: MAXRIGHT at lam = 0.5 with k in {1, 10, 50, 200} (k = 200 refreshes
only at step 0: the miniature of the notes' k = 1000, longer than an epoch). The ideal point: `sft_only` and
`dpo_only`, the two runs `ptlab ideal-point` makes (schedule mix, lam 0 or 1), on each seed.

Tuning, seed 0 only (never a reported seed), the same rule for every method, rate grid {1e-4, 3e-4, 1e-3}:
1. `experiments/sweeps/xright_tune.yaml`: sft_only and dpo_only at each rate; an objective's rate is the one
   with the lowest final value of that objective on its full training set (ties: the smaller rate). Their
   final train-set values at those rates are the f* given to MAXRIGHT (`method.joint.f_star_sft` /
   `f_star_dpo`) on every seed: one f*, computed once, as the paper's scripts do.
2. `experiments/sweeps/xright_tune2.yaml`: each joint method (the six above) at lam = 0.5 (split 0.5) at each
   rate; its rate is the one with the lowest held-out ideal distance at step 200, measured against the seed-0
   held-out ideal point of step 1's chosen runs (ties: the smaller rate). A method keeps its rate at every
   lam; the k-ablation cells take MAXRIGHT k = 10's rate; sft_only and dpo_only keep step 1's rates.

Measured. Held-out f_SFT and f_DPO every 20 steps (the trajectories). At steps 0 and 200, task metrics on
`test_style.jsonl` (the 256 held-out prompts of levels 1-4): SFT side, the greedy completion is exactly the
terse answer (`toy.world.terse_reward`); DPO side, the greedy completion is exactly the right worked solution,
the answer the preference rule prefers (`toy.world.worked_reward`); also their sampled avg@4. Runtime: the sum
of the logged `step_time` over the 200 steps (training only; held-out evaluation excluded); memory: the
process's peak resident memory (`peak_rss_mb`) at step 200. Cells run two at a time on the two cores, one
thread each.

Definitions (per seed): gap_SFT = f_SFT - f*_SFT and gap_DPO = f_DPO - f*_DPO on the held-out sets at step 200,
with f* the held-out values of that seed's sft_only and dpo_only runs; ideal distance = the Euclidean norm of
(gap_SFT, gap_DPO) (the paper's metric).

Verdict rules, written and committed before the runs that decide them:
- xright_tradeoff (the Pythia figures: trajectories, optimality gaps, ideal distance): (A) ALRIGHT's ideal
  distance is below both sequential orders' at every lam, in every seed; (B) the same for MAXRIGHT (k = 10);
  (C) MAXRIGHT (k = 10) has the lowest mean (over seeds) ideal distance among Sequential SFT->DPO, Sequential
  DPO->SFT, Mix, ALRIGHT and MAXRIGHT (k = 10) at two or more of the three lam. held = yes if A, B and C hold,
  partly if one or two, no if none.
- xright_cost (the runtime and memory bars, as % over sequential): a method's runtime ratio at a lam and seed
  is its runtime over the mean of the two sequential orders' at that lam and seed. (A) Mix's ratio, mean over
  seeds, is at least 1.2 at every lam; (B) ALRIGHT's is within [0.9, 1.1] at every lam; (C) MAXRIGHT
  (k = 10)'s is within [0.9, 1.2] at every lam. held = yes if all three, partly if one or two, no if none.
  Peak memory is reported beside them and not graded: on CPU the tiny model's share of a process's memory is
  small against the fixed footprint of torch.
- xright_tasks (the Llama benchmark table): greedy terse rate (SFT side) and greedy worked rate (DPO side) at
  step 200, mean over seeds, against Sequential SFT->DPO at the same lam (the table's sequential). (A) ALRIGHT
  is above it on the DPO side at two or more lam; (B) MAXRIGHT (k = 10) likewise; (C) ALRIGHT or MAXRIGHT
  (k = 10) is above it on the SFT side at two or more lam. held = yes if all three, partly if one or two, no
  if none.
- xright_k (the refresh-interval ablation), lam = 0.5: (A) runtime falls with k, mean over seeds k=1 > k=10
  > k=50; (B) k = 1's ideal distance is at most k = 200's in every seed. held = yes if both, partly if one,
  no if neither.
"""
