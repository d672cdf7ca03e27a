"""Builders for unit tests, one module per kind: job, pod, service, node, cluster."""

from .cluster import GPU, LEVEL_LABELS, ClusterBuilder, cluster, gang, hosts
from .job import JobBuilder, make_job, trainjob_object
from .node import node
from .pod import pod
from .service import SERVICE, TINY, group_pods, make_service

__all__ = [
    "GPU",
    "LEVEL_LABELS",
    "SERVICE",
    "TINY",
    "ClusterBuilder",
    "JobBuilder",
    "cluster",
    "gang",
    "group_pods",
    "hosts",
    "make_job",
    "make_service",
    "node",
    "pod",
    "trainjob_object",
]
