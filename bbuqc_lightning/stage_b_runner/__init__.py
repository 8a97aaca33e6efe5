"""Training-free Stage-B: prompt + per-mission guidance improved by reflection, no weight update (SPEC §7).

Read in this order:

- ``module.py``        the LightningModule (``+experiment=stage_b_runner``): one epoch = one reflection round;
- ``rollout.py``       K sampled answers per group under the current guidance (the one engine);
- ``selection.py``     one answer per group: majority verdict among valid answers, ties -> 不通过;
- ``reflection.py``    the reflection prompt and the strict JSON operations it must answer;
- ``reflection_round.py`` one round over all missions: apply, reject, or queue for review;
- ``guidance.py``      versioned experiences ``G0, G1, …`` (pure operations, size cap);
- ``artifacts.py``     the per-mission files (guidance.json + snapshots, trajectories, selections, …);
- ``review.py``        apply reviewed proposals of review mode (``tools/approve_guidance.py``);
- ``distill.py``       Teacher distillation rows (chatml) and conflict policies, atomic file replacement;
- ``config.py``        ``RunnerConfig`` and ``FinalRolloutConfig`` (distillation's final rollout).

Teacher distillation writes the final rollout's selections as chatml (``callbacks/distillation.py``,
``tools/distill.py``, ``+experiment=distill``); ``tools/approve_guidance.py`` approves review-mode proposals.
"""
