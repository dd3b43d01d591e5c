"""The one place the miniature imports the project's non-method files from (sources/: the task tables' names, the
tokenizer, the cache directory). Everything else in miniature/ imports from here (and `t5`, `adafactor` from the
root), and drives training and evaluation through train.py and evaluate.py.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from sources import EVAL_TABLE, TRAIN_TABLE  # noqa: E402,F401
from sources.demo import cache_root  # noqa: E402,F401
from sources.tokenizer import EOS, PAD, UNK, Tokenizer  # noqa: E402,F401
