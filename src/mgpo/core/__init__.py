"""The method, and nothing else: MGPO's rollout, reward, advantage and loss, and the loop
that ties them together.

The method is Huang et al., "High-Resolution Visual Reasoning via Multi-Turn Grounding-Based
Reinforcement Learning" (arXiv:2507.05920); its authors released their training code as a
fork of verl (github.com/EvolvingLMMs-Lab/MGPO points to it). "The authors' code" in the
comments below means that code; "the reference model" always means the frozen model of the
KL term.

Reading order (an afternoon, top to bottom):

1. ``trainer.py``   the loop: prompts -> rollout -> rewards -> group advantages -> old and
                    reference log-probs -> optimizer steps -> log -> checkpoint; its callees
                    follow it in call order.
2. ``rollout.py``   the paper's two turns: generate a box, crop the original, answer.
3. ``grounding.py`` parse, check and map a box from the model's input pixels to the
                    original image; crop and resize (pure functions).
4. ``prompts.py``   the paper's exact strings, rendered through the chat template.
5. ``reward.py``    the last ``\\boxed{}`` letter, the binary reward, group advantages.
6. ``policy.py``    training log-probs of the sampled tokens (mRoPE, masked-only lm_head).
7. ``loss.py``      PPO-clipped policy loss, k3 KL, entropy: masked token means.

Then, as needed:

- ``conversation.py`` the pieces every turn loop shares, and the one place that builds the
  loss mask (``assemble``); ``trajectory.py`` the typed hand-overs (``Trajectory``, ``Rollout``);
- ``generation.py`` batched ``generate`` with vision tokens suppressed, the turn-2 cache
  continuation and ZeRO-3 lock-step;
- ``setup.py`` everything the loop works with, built once (model, optimizer, data, resume);
- ``metrics.py`` the figures a rollout batch logs.

Skip on a first read: ``zoom.py`` (``mgpo_k``, K turns, beyond the paper), ``forced.py``
and ``sft.py`` (supervised targets in the rollout's own format).
"""
