"""Data layer: readers, prepared-domain format, leave-one-out splits, batches (docs/design.md §1)."""

from metarec.data.batches import TrainWindows, left_pad
from metarec.data.domain import Domain, load_domains, load_item_map
from metarec.data.prepare import prepare_domain, prepare_shared
from metarec.data.synthetic import generate_domains

__all__ = [
    "Domain",
    "TrainWindows",
    "generate_domains",
    "left_pad",
    "load_domains",
    "load_item_map",
    "prepare_domain",
    "prepare_shared",
]
