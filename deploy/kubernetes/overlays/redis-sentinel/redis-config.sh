#!/bin/sh
# Writes this pod's redis.conf and sentinel.conf into /conf (an emptyDir, 0700).
# The primary is whichever pod the sentinels name now, so a pod that restarts
# after a failover rejoins as a replica; only when no sentinel answers (the first
# start) is it pod 0. Every pod announces its stable DNS name, not its pod IP,
# which changes when it restarts.
set -eu
service=p2preg
self="$HOSTNAME.p2preg-redis"
password=$(cat /run/p2preg/store/password)
primary=""
for i in 0 1 2; do
    if [ "p2preg-redis-$i" = "$HOSTNAME" ]; then continue; fi
    answer=$(timeout 3 redis-cli -h "p2preg-redis-$i.p2preg-redis" -p 26379 --raw \
        SENTINEL get-master-addr-by-name "$service" 2>/dev/null | head -n 1) || answer=""
    if [ -n "$answer" ]; then
        primary=$answer
        break
    fi
done
if [ -z "$primary" ]; then
    primary="p2preg-redis-0.p2preg-redis"
fi
umask 077
{
    echo "port 6379"
    echo "dir /data"
    echo "appendonly yes"
    echo "replica-announce-ip $self"
    echo "requirepass $password"
    echo "masterauth $password"
    if [ "$primary" != "$self" ]; then
        echo "replicaof $primary 6379"
    fi
} >/conf/redis.conf
{
    echo "port 26379"
    echo "dir /conf"
    echo "sentinel resolve-hostnames yes"
    echo "sentinel announce-hostnames yes"
    echo "sentinel announce-ip $self"
    echo "sentinel monitor $service $primary 6379 2"
    echo "sentinel down-after-milliseconds $service 5000"
    echo "sentinel failover-timeout $service 60000"
    echo "sentinel parallel-syncs $service 1"
    echo "sentinel auth-pass $service $password"
} >/conf/sentinel.conf
