"""Where the bytes come from: the Hugging Face hub as read here (hub.py), P3's parquet files and task tables (p3.py),
seqio's packing (packing.py), T5's SentencePiece vocabulary (tokenizer.py), the offline demo's data (demo.py) and
Hugging Face T5 checkpoints (t5_weights.py). data.py at the root is what the training and evaluation scripts read."""

# The task tables a P3-layout directory may carry (the demo writes its own; p3/ holds P3's): the training mixture
# and the held-out evaluation, in the format p3/README.md describes.
TRAIN_TABLE, EVAL_TABLE = "t0_train_tasks.tsv", "t0_eval_tasks.tsv"
