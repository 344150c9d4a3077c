"""Mixture-of-experts compression: expert usage statistics, expert pruning and expert merging."""
from .experts import ExpertUsage, cluster_experts, least_used, merge_stacked, merge_weights
from .router import RemappedRouter

__all__ = ["ExpertUsage", "RemappedRouter", "cluster_experts", "least_used", "merge_stacked", "merge_weights"]
