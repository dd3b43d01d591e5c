"""The paper in miniature: a world, a backbone pretrained on it, P3-shaped tasks, every method with seeds, a verdict.

See miniature/README.md. Run everything with `python -m miniature` from the repository root.
"""
