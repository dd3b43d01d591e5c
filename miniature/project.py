"""The one place the miniature imports the project's non-method files from (data sources, tokenizer, cache).

The project is moving demo_data.py, p3_source.py and tokenizer.py into a `sources/` package; when it lands, only
the imports below change. Everything else in miniature/ imports from here (and `t5`, `adafactor` from the root).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from demo_data import cache_root  # noqa: E402,F401
from p3_source import EVAL_TABLE, TRAIN_TABLE  # noqa: E402,F401
from tokenizer import EOS, PAD, UNK, Tokenizer  # noqa: E402,F401
