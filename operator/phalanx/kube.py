"""The one module that talks to the API server (official `kubernetes` client).

Calls are synchronous; the handlers run them in a thread pool. Every request is counted by
verb and resource for the operator's metrics and the benchmarks' requests-per-job figure.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from phalanx import metrics
from phalanx.constants import GROUP, VERSION

T = TypeVar("T")
# (connect, read) seconds: a stuck connection must fail and be retried, never hang a worker.
TIMEOUT = (5, 30)
_api: client.ApiClient | None = None


def connect() -> client.ApiClient:
    """Load credentials once: $KUBECONFIG / ~/.kube/config, else the in-cluster service account."""
    global _api
    if _api is None:
        try:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        configuration = client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = 64
        _api = client.ApiClient(configuration)
    return _api


# Hot paths (pod create/patch/delete, status patches) speak JSON to the API server directly:
# the generated client would validate every body and build a model tree for every answer,
# which costs more CPU than the request itself when a 64-pod gang is created at once.
_CORE_PLURALS = {
    "Pod": "pods",
    "Service": "services",
    "ConfigMap": "configmaps",
    "PersistentVolumeClaim": "persistentvolumeclaims",
}
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
# Server-side apply records which fields are ours under this manager.
FIELD_MANAGER = "phalanx"


def _rest(
    verb: str,
    resource: str,
    method: str,
    path: str,
    body: Any = None,
    content_type: str = "application/json",
) -> dict[str, Any]:
    api = connect()
    metrics.API_REQUESTS.labels(verb=verb, resource=resource).inc()
    _, url, headers, payload, _ = api.param_serialize(
        method=method,
        resource_path=path,
        header_params={"Accept": "application/json", "Content-Type": content_type},
        body=body,
        auth_settings=["BearerToken"],
    )
    response = api.call_api(
        method, url, header_params=headers, body=payload, _request_timeout=TIMEOUT
    )
    response.read()  # type: ignore[no-untyped-call]
    if not 200 <= response.status < 300:
        raise ApiException(http_resp=response)
    result: dict[str, Any] = json.loads(response.data or b"{}")
    return result


def _collection(api_version: str, namespace: str, plural: str) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{base}/namespaces/{namespace}/{plural}"


def _call(verb: str, resource: str, fn: Callable[[], T]) -> T:
    metrics.API_REQUESTS.labels(verb=verb, resource=resource).inc()
    return fn()


def _sanitize(obj: Any) -> dict[str, Any]:
    """A client model or raw response as a plain camelCase dict."""
    result: dict[str, Any] = connect().sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
    return result


def _object(response: object) -> dict[str, Any]:
    """Custom-object calls answer with plain dicts already."""
    return response if isinstance(response, dict) else _sanitize(response)


def _namespace_terminating(error: ApiException) -> bool:
    """Creating into a namespace being deleted is pointless, not an error to retry."""
    return error.status == 403 and "NamespaceTerminating" in str(error.body)


def _absent_ok(error: ApiException) -> None:
    if error.status != 404:
        raise error


def core() -> client.CoreV1Api:
    return client.CoreV1Api(connect())


def custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(connect())


class Rejected(Exception):
    """The API server refused a write for a reason retrying cannot fix (4xx, not a conflict):
    an invalid object, a quota, an admission webhook. `message` is the server's own."""

    def __init__(self, kind: str, name: str, code: int, message: str) -> None:
        super().__init__(f"{kind} {name}: HTTP {code}: {message}")
        self.kind = kind
        self.name = name
        self.code = code
        self.message = message


def server_message(error: ApiException) -> str:
    """The `message` of the Status object the API server answered with, else its body."""
    body = error.body.decode() if isinstance(error.body, bytes) else str(error.body or "")
    try:
        status = json.loads(body)
    except ValueError:
        return body.strip() or str(error.reason or error.status)
    return str(status.get("message") or body) if isinstance(status, dict) else body


def create(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Create a namespaced object; None when it already exists (creation is idempotent).

    Raises `Rejected` when the API server refuses the object itself (4xx other than 409).
    """
    kind = manifest["kind"]
    namespace = manifest["metadata"]["namespace"]
    plural = _CORE_PLURALS.get(kind) or kind.lower() + "s"
    path = _collection(manifest["apiVersion"], namespace, plural)
    try:
        return _rest(
            "create", kind.lower() if kind in _CORE_PLURALS else plural, "POST", path, manifest
        )
    except ApiException as error:
        if error.status == 409 or _namespace_terminating(error):
            return None
        if error.status is not None and 400 <= error.status < 500 and error.status != 429:
            raise Rejected(
                kind, manifest["metadata"]["name"], error.status, server_message(error)
            ) from error
        raise


def _object_path(manifest: dict[str, Any]) -> tuple[str, str]:
    """(resource name for metrics, the object's URL path)."""
    kind = manifest["kind"]
    plural = _CORE_PLURALS.get(kind) or kind.lower() + "s"
    path = _collection(manifest["apiVersion"], manifest["metadata"]["namespace"], plural)
    return (
        kind.lower() if kind in _CORE_PLURALS else plural
    ), f"{path}/{manifest['metadata']['name']}"


def apply(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Server-side apply as field manager `phalanx` (taking over fields others set by hand).

    Returns the object as stored; None when its namespace is being deleted. Raises `Rejected`
    when the API server refuses the object (4xx other than a conflict), including 404 for a
    kind it does not serve (a PodGroup without Volcano or the coscheduling plugin installed).
    """
    resource, path = _object_path(manifest)
    query = f"?fieldManager={FIELD_MANAGER}&force=true"
    try:
        return _rest("apply", resource, "PATCH", path + query, manifest, APPLY_PATCH)
    except ApiException as error:
        if _namespace_terminating(error):
            return None
        if error.status is not None and 400 <= error.status < 500 and error.status != 429:
            raise Rejected(
                manifest["kind"], manifest["metadata"]["name"], error.status, server_message(error)
            ) from error
        raise


def delete(api_version: str, kind: str, namespace: str, name: str) -> None:
    """Delete a child the operator no longer wants (gone already is fine)."""
    manifest = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"namespace": namespace, "name": name},
    }
    resource, path = _object_path(manifest)
    body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
    try:
        _rest("delete", resource, "DELETE", path, body)
    except ApiException as error:
        _absent_ok(error)


def delete_pod(namespace: str, name: str, force: bool = False) -> dict[str, Any] | None:
    """Delete a pod (gracefully, or at once for pods on dead nodes); the pod as it is now, if any."""
    body = {"kind": "DeleteOptions", "apiVersion": "v1"} | (
        {"gracePeriodSeconds": 0} if force else {}
    )
    try:
        result = _rest(
            "delete", "pod", "DELETE", f"{_collection('v1', namespace, 'pods')}/{name}", body
        )
    except ApiException as error:
        _absent_ok(error)
        return None
    return result if result.get("kind") == "Pod" else None


def patch_pod(namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
    """JSON merge patch (null removes a field, maps merge); None if the pod is gone."""
    path = f"{_collection('v1', namespace, 'pods')}/{name}"
    try:
        return _rest("patch", "pod", "PATCH", path, patch, MERGE_PATCH)
    except ApiException as error:
        _absent_ok(error)
        return None


def patch_status(
    plural: str, namespace: str, name: str, status: dict[str, Any]
) -> dict[str, Any] | None:
    """Merge-patch the status subresource; returns the updated object (None if it is gone)."""
    path = f"{_collection(f'{GROUP}/{VERSION}', namespace, plural)}/{name}/status"
    try:
        return _rest("patch", f"{plural}/status", "PATCH", path, {"status": status}, MERGE_PATCH)
    except ApiException as error:
        _absent_ok(error)
        return None


def scale(plural: str, namespace: str, name: str, replicas: int) -> dict[str, Any] | None:
    """Set spec.replicas through the scale subresource, as HPA does; None if the object is gone."""
    try:
        return _object(
            _call(
                "patch",
                f"{plural}/scale",
                lambda: custom().patch_namespaced_custom_object_scale(
                    GROUP,
                    VERSION,
                    namespace,
                    plural,
                    name,
                    {"spec": {"replicas": replicas}},
                    _request_timeout=TIMEOUT,
                ),
            )
        )
    except ApiException as error:
        _absent_ok(error)
        return None


def delete_custom(plural: str, namespace: str, name: str) -> None:
    try:
        _call(
            "delete",
            plural,
            lambda: custom().delete_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                propagation_policy="Background",
                _request_timeout=TIMEOUT,
            ),
        )
    except ApiException as error:
        _absent_ok(error)


def get_custom(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _object(
            _call(
                "get",
                plural,
                lambda: custom().get_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, name, _request_timeout=TIMEOUT
                ),
            )
        )
    except ApiException as error:
        _absent_ok(error)
        return None


def event(involved: dict[str, Any], kind: str, reason: str, message: str) -> None:
    """Record a Kubernetes Event on an object (best effort: events never block reconciliation)."""
    meta = involved["metadata"]
    body: Any = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": involved.get("apiVersion"),
            "kind": involved.get("kind"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": kind,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "phalanx-operator"},
        "reportingComponent": "phalanx.dev/operator",
        "count": 1,
    }
    with contextlib.suppress(ApiException):
        _call(
            "create",
            "event",
            lambda: core().create_namespaced_event(
                meta["namespace"], body, _request_timeout=TIMEOUT
            ),
        )


def is_conflict(error: Exception) -> bool:
    return isinstance(error, ApiException) and error.status == 409


def list_all(kind: str) -> list[dict[str, Any]]:
    """Every Node, Pod or claim in the cluster, as plain dicts (the cache's first fill)."""
    api = core()
    listers: dict[str, Callable[[], Any]] = {
        "Node": lambda: api.list_node(_request_timeout=TIMEOUT),
        "Pod": lambda: api.list_pod_for_all_namespaces(_request_timeout=TIMEOUT),
        "PersistentVolumeClaim": lambda: api.list_persistent_volume_claim_for_all_namespaces(
            _request_timeout=TIMEOUT
        ),
    }
    items = _sanitize(_call("list", kind.lower(), listers[kind])).get("items") or []
    for item in items:
        item.setdefault("kind", kind)
        item.setdefault("apiVersion", "v1")
    return list(items)
