#!/bin/sh
# One Redis of the load store (StatefulSet triage-redis): the primary, or a replica of the
# primary the Sentinels name. redis.conf is the repository's redis/redis.conf (a copy; the test
# fails if they differ); the lines after it open it to the pod network, set the password and
# announce the pod's stable DNS name, so that Sentinel hands clients names, not pod IPs.
# Environment: POD_NAME, REDIS_SERVICE, SENTINEL_STATEFULSET, SENTINEL_SERVICE, SENTINELS,
# MASTER_NAME, LOAD_STORE_PASSWORD, REDISCLI_AUTH (= the password, for redis-cli).
set -eu

me="${POD_NAME}.${REDIS_SERVICE}"
statefulset="${POD_NAME%-*}"
conf=/run/triage/redis.conf

# The primary: whatever a Sentinel names now (after a failover it is no longer pod 0), else
# pod 0 (first start of the set: no Sentinel knows a primary yet).
primary=""
i=0
while [ "$i" -lt "$SENTINELS" ]; do
  host="${SENTINEL_STATEFULSET}-${i}.${SENTINEL_SERVICE}"
  answer=$(timeout 3 redis-cli -h "$host" -p 26379 SENTINEL get-master-addr-by-name "$MASTER_NAME" 2>/dev/null | head -n 1) || answer=""
  case "$answer" in
    "" | *" "* | ERR* | NOAUTH* | WRONGPASS*) ;;
    *) primary="$answer"; break ;;
  esac
  i=$((i + 1))
done
if [ -z "$primary" ]; then
  primary="${statefulset}-0.${REDIS_SERVICE}"
fi

umask 077
cat /etc/triage/redis/redis.conf > "$conf"
cat >> "$conf" <<CONF

# --- Kubernetes (deploy/kubernetes/base/redis/redis-start.sh) ---
bind * -::*
port 6379
dir /data
requirepass "${LOAD_STORE_PASSWORD}"
masterauth "${LOAD_STORE_PASSWORD}"
replica-announce-ip ${me}
CONF
if [ "$primary" != "$me" ]; then
  echo "replicaof ${primary} 6379" >> "$conf"
  echo "redis-start: ${me} starts as a replica of ${primary}"
else
  echo "redis-start: ${me} starts as the primary"
fi
exec redis-server "$conf"
