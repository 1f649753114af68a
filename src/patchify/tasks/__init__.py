"""One module per task (``task=``): eval, extract, index, search; :data:`TASKS` maps names to functions."""

from .evaluate import run_eval
from .extract import run_extract
from .index import run_index
from .search import run_search

TASKS = {"eval": run_eval, "extract": run_extract, "index": run_index, "search": run_search}
