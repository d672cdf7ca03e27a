"""The one module that talks to the API server (official `kubernetes` client).

Calls are synchronous; the handlers run them in a thread pool. Every request is counted by
verb and resource for the operator's metrics and the benchmarks' requests-per-job figure.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from phalanx import metrics, status
from phalanx.constants import (
    GROUP,
    INFERENCE_KIND,
    INFERENCE_PLURAL,
    TRAINJOB_KIND,
    TRAINJOB_PLURAL,
    VERSION,
)

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


@dataclass(frozen=True)
class Credentials:
    """What a client needs to talk to the API server as the operator, whichever way the
    credentials came: a token or a client certificate in a kubeconfig, or the in-cluster
    service account."""

    server: str
    ca_path: str | None = None
    insecure: bool = False
    certificate_path: str | None = None
    private_key_path: str | None = None
    scheme: str | None = None
    token: str | None = None
    username: str | None = None
    password: str | None = None


def credentials_of(configuration: client.Configuration) -> Credentials:
    """The credentials a loaded client configuration carries.

    kubernetes >= 36 keeps a bearer token under `BearerToken`, older releases under
    `authorization`; reading the key through the configuration also runs its refresh hook, so a
    rotated service-account token or an expired exec credential is renewed.
    """
    header = str(
        configuration.get_api_key_with_prefix("BearerToken")
        or configuration.get_api_key_with_prefix("authorization")
        or ""
    )
    scheme, _, token = header.partition(" ") if " " in header else ("", "", header)
    return Credentials(
        server=str(configuration.host),
        ca_path=configuration.ssl_ca_cert or None,
        insecure=not configuration.verify_ssl,
        certificate_path=configuration.cert_file or None,
        private_key_path=configuration.key_file or None,
        scheme=scheme or None,
        token=token.strip() or None,
        username=configuration.username or None,
        password=configuration.password or None,
    )


def check_access() -> None:
    """Raise unless the API server answers and lets the operator read what it must.

    Listing one node needs the credentials to work and the cluster role the operator always
    has (placement reads every node, with or without watched namespaces), so it fails exactly
    when the operator is cut off, logged in anonymously or stripped of its role; the liveness
    probe runs it.
    """
    _rest("list", "node", "GET", "/api/v1/nodes?limit=1")


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


def delete_pod(
    namespace: str, name: str, force: bool = False, uid: str | None = None
) -> dict[str, Any] | None:
    """Delete a pod (gracefully, or at once for pods on dead nodes); the pod as it is now, if any.

    With `uid`, only that pod: a newer pod of the same name (pods are named by rank, so every
    generation reuses the names) is left alone, and the answer is None as for a pod gone."""
    body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
    if force:
        body["gracePeriodSeconds"] = 0
    if uid:
        body["preconditions"] = {"uid": uid}
    try:
        result = _rest(
            "delete", "pod", "DELETE", f"{_collection('v1', namespace, 'pods')}/{name}", body
        )
    except ApiException as error:
        if uid and error.status == 409:  # the precondition failed: that pod is gone
            return None
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


class EventRecorder:
    """Events as client-go's recorder writes them: every timestamp set, and a repeat of an
    event already recorded (same object, type, reason and message) patched onto it with its
    count raised instead of a new object. Best effort: events never block reconciliation."""

    # Keys remembered; the oldest is forgotten first (its next repeat starts a new event).
    SIZE = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, ...], tuple[str, int]] = {}
        self._instance = socket.gethostname()

    def record(
        self,
        involved: dict[str, Any],
        kind: str,
        reason: str,
        message: str,
        now: datetime | None = None,
    ) -> None:
        now = now or datetime.now(UTC)
        key = status.event_key(involved, kind, reason, message)
        namespace = involved["metadata"]["namespace"]
        with self._lock:
            seen = self._seen.get(key)
        if seen is not None:
            name, count = seen
            path = f"{_collection('v1', namespace, 'events')}/{name}"
            try:
                _rest(
                    "patch",
                    "event",
                    "PATCH",
                    path,
                    status.event_repeat(count + 1, now),
                    MERGE_PATCH,
                )
                self._remember(key, name, count + 1)
                return
            except ApiException as error:
                if error.status != 404:  # expired (events live an hour): record it anew
                    return
        body = status.event_body(involved, kind, reason, message, now, self._instance)
        try:
            created = _rest("create", "event", "POST", _collection("v1", namespace, "events"), body)
        except ApiException:
            return
        self._remember(key, str(created["metadata"]["name"]), 1)

    def _remember(self, key: tuple[str, ...], name: str, count: int) -> None:
        with self._lock:
            self._seen.pop(key, None)
            self._seen[key] = (name, count)
            while len(self._seen) > self.SIZE:
                del self._seen[next(iter(self._seen))]


_recorder = EventRecorder()


def event(involved: dict[str, Any], kind: str, reason: str, message: str) -> None:
    """Record a Kubernetes Event on an object (aggregated with its repeats)."""
    _recorder.record(involved, kind, reason, message)


def is_conflict(error: Exception) -> bool:
    return isinstance(error, ApiException) and error.status == 409


def list_all(kind: str) -> list[dict[str, Any]]:
    """Every Node, Namespace, Pod, claim, LLMTrainJob or InferenceService in the cluster, as
    plain dicts (the cache's first fill)."""
    api = core()
    custom_plurals = {TRAINJOB_KIND: TRAINJOB_PLURAL, INFERENCE_KIND: INFERENCE_PLURAL}
    listers: dict[str, Callable[[], Any]] = {
        "Node": lambda: api.list_node(_request_timeout=TIMEOUT),
        # Namespaces carry the pod security level their workload pods are rendered for.
        "Namespace": lambda: api.list_namespace(_request_timeout=TIMEOUT),
        "Pod": lambda: api.list_pod_for_all_namespaces(_request_timeout=TIMEOUT),
        "PersistentVolumeClaim": lambda: api.list_persistent_volume_claim_for_all_namespaces(
            _request_timeout=TIMEOUT
        ),
        **{
            kind_: functools.partial(
                custom().list_cluster_custom_object,
                GROUP,
                VERSION,
                plural,
                _request_timeout=TIMEOUT,
            )
            for kind_, plural in custom_plurals.items()
        },
    }
    resource = custom_plurals.get(kind) or kind.lower()
    items = _sanitize(_call("list", resource, listers[kind])).get("items") or []
    api_version = f"{GROUP}/{VERSION}" if kind in custom_plurals else "v1"
    for item in items:
        item.setdefault("kind", kind)
        item.setdefault("apiVersion", api_version)
    return list(items)


_LEASES = "coordination.k8s.io/leases"


def _lease_path(namespace: str, name: str = "") -> str:
    base = _collection("coordination.k8s.io/v1", namespace, "leases")
    return f"{base}/{name}" if name else base


def get_lease(namespace: str, name: str) -> dict[str, Any] | None:
    """The leader-election Lease, or None when there is none yet."""
    try:
        return _rest("get", _LEASES, "GET", _lease_path(namespace, name))
    except ApiException as error:
        _absent_ok(error)
        return None


def create_lease(namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """Create the Lease; None when another replica created it first (409)."""
    try:
        return _rest("create", _LEASES, "POST", _lease_path(namespace), body)
    except ApiException as error:
        if error.status == 409:
            return None
        raise


def replace_lease(namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """Replace the Lease as read (its resourceVersion makes this conditional); None when another
    replica wrote it in between (409) or it is gone."""
    try:
        return _rest("update", _LEASES, "PUT", _lease_path(namespace, name), body)
    except ApiException as error:
        if error.status in (404, 409):
            return None
        raise


def list_pods(namespace: str, label_selector: str) -> list[dict[str, Any]]:
    """The pods of one namespace matching a label selector, read from the API server itself
    (to confirm what the watch-fed cache says is gone before acting on it)."""
    query = urllib.parse.urlencode({"labelSelector": label_selector})
    listing = _rest("list", "pod", "GET", f"{_collection('v1', namespace, 'pods')}?{query}")
    items: list[dict[str, Any]] = listing.get("items") or []
    for item in items:
        item.setdefault("kind", "Pod")
        item.setdefault("apiVersion", "v1")
    return items
