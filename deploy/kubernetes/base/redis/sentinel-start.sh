#!/bin/sh
# One Sentinel of the load store (StatefulSet triage-redis-sentinel). It monitors the primary
# the other Sentinels name, else pod 0 of the Redis set, and announces the pod's stable DNS name.
# Environment: POD_NAME, SENTINEL_SERVICE, SENTINELS, REDIS_STATEFULSET, REDIS_SERVICE,
# MASTER_NAME, QUORUM, LOAD_STORE_PASSWORD, REDISCLI_AUTH (= the password, for redis-cli).
set -eu

me="${POD_NAME}.${SENTINEL_SERVICE}"
statefulset="${POD_NAME%-*}"
conf=/run/triage/sentinel.conf

primary=""
i=0
while [ "$i" -lt "$SENTINELS" ]; do
  host="${statefulset}-${i}.${SENTINEL_SERVICE}"
  if [ "$host" != "$me" ]; then
    answer=$(timeout 3 redis-cli -h "$host" -p 26379 SENTINEL get-master-addr-by-name "$MASTER_NAME" 2>/dev/null | head -n 1) || answer=""
    case "$answer" in
      "" | *" "* | ERR* | NOAUTH* | WRONGPASS*) ;;
      *) primary="$answer"; break ;;
    esac
  fi
  i=$((i + 1))
done
if [ -z "$primary" ]; then
  primary="${REDIS_STATEFULSET}-0.${REDIS_SERVICE}"
fi
# Sentinel refuses to monitor a name that does not resolve yet (the Redis pod not created yet)
until getent hosts "$primary" > /dev/null; do
  echo "sentinel-start: waiting for ${primary} to resolve"
  sleep 2
done

umask 077
cat > "$conf" <<CONF
# deploy/kubernetes/base/redis/sentinel-start.sh
port 26379
dir /run/triage
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip ${me}
requirepass "${LOAD_STORE_PASSWORD}"
sentinel sentinel-pass "${LOAD_STORE_PASSWORD}"
sentinel monitor ${MASTER_NAME} ${primary} 6379 ${QUORUM}
sentinel auth-pass ${MASTER_NAME} "${LOAD_STORE_PASSWORD}"
sentinel down-after-milliseconds ${MASTER_NAME} 5000
sentinel failover-timeout ${MASTER_NAME} 60000
sentinel parallel-syncs ${MASTER_NAME} 1
CONF
echo "sentinel-start: ${me} monitors ${MASTER_NAME} at ${primary}"
exec redis-server "$conf" --sentinel
