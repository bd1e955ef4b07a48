"""APro affinity propagation: global (GP, over the image's minimum spanning tree) and local (LP)."""

from .gp import Tree, build_tree, global_propagation, propagate, reweight
from .lp import local_propagation

__all__ = ["Tree", "build_tree", "propagate", "reweight", "global_propagation", "local_propagation"]
