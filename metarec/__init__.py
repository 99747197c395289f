"""metarec: Ray-distributed meta-training for transferable sequential recommendation.

Implements MetaRec (arXiv 2411.01785): multi-head vector quantization of source item
embeddings onto the target item table, and second-order meta learning with per-layer,
similarity-based rescaling of the source tasks' meta gradients.
"""

__version__ = "0.1.0"
