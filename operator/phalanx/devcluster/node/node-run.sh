#!/bin/bash
# node-run.sh NODE_DIR: one real node of the dev cluster. Started (by realnode.py) inside the
# cluster's network namespace and in a new private mount namespace (unshare -m), it prepares
# that mount namespace, then runs containerd and, once `NODE_DIR/start-kubelet` exists (images
# are loaded by then), the kubelet. containerd and the kubelet must share this mount namespace:
# runc has to see the kubelet's tmpfs volumes (service-account tokens).
set -euo pipefail
D=$1
BIN=$(cat "$D/bin-dir")
mount --make-rprivate /

# A sysfs of this network namespace (CNI and cAdvisor read /sys/class/net), then the cgroup
# hierarchies again on top, as the machine's mount namespace lists them.
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
while read -r _ target type options _; do
  extra=$(tr , '\n' <<<"$options" | { grep -vE '^(rw|ro|relatime|nosuid|nodev|noexec|seclabel)$' || true; } | paste -sd, -)
  mkdir -p "$target"
  mount -t "$type" ${extra:+-o "$extra"} "$type" "$target"
done < "$D/cgroup-mounts"

# Runtime state (shim sockets, runc state, pod netns files) and pod logs stay in the node.
mount --bind "$D/run" /run
mount --bind "$D/log" /var/log

# The kubelet runs with protectKernelDefaults: it only checks its tunables, never writes them.
# It reads the values it wants from plain files bound over /proc/sys here, and every global
# kernel.* and vm.* file is read-only in this mount namespace, so no process of the node can
# change a setting of the machine. Containers get a fresh procfs and see the real values.
for dir in /proc/sys/kernel /proc/sys/vm; do
  mount --bind "$dir" "$dir"
  mount -o remount,bind,ro "$dir"
done
for file in "$D"/sysctl/*; do
  mount --bind "$file" "/proc/sys/$(basename "$file" | tr . /)"
done
if [ -w /proc/sys/kernel/pid_max ] || [ -w /proc/sys/vm/swappiness ]; then
  echo "refusing to start: /proc/sys/kernel or /proc/sys/vm is writable in the node" >&2
  exit 1
fi

children=()
stop() {
  for pid in "${children[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait || true
  exit 0
}
trap stop TERM INT

"$BIN/containerd" --config "$D/containerd.toml" >"$D/containerd.log" 2>&1 &
children+=($!)
echo $! >"$D/containerd.pid"
until [ -e "$D/start-kubelet" ]; do sleep 0.1; done
"$BIN/kubelet" $(cat "$D/kubelet.args") >"$D/kubelet.log" 2>&1 &
children+=($!)
echo $! >"$D/kubelet.pid"
wait -n
echo "a node process exited; stopping the node" >&2
stop
