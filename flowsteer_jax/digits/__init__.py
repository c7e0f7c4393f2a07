"""The digits world: a tiny SD3 on scikit-learn's 8x8 handwritten digits, runnable on a laptop CPU.

docs/design.md, "Worlds".

- `data`: pairs of digits side by side, (8, 16, 1) channels-last in [-1, 1] (the "VAE" is identity), with
  prompts naming both digits and their places; a fixed stratified held-out split for evaluation.
- `text`: a word-level tokenizer built in code and tiny frozen random CLIP-L/CLIP-G/T5-shaped encoders behind
  the real SD3 conditioning path (`SD3PromptEncoder`).
- `teacher`: a tiny MMDiT pretrained with rectified-flow matching (and CFG dropout), saved as a diffusers folder.
- `evaluate`: a digit classifier; prompt accuracy, Fréchet distance in its feature space, distance to a
  reference; a fixed evaluation set and a jitted batched sampler.
"""
