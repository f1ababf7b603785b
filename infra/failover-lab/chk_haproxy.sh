#!/bin/sh
# keepalived's health check of the local HAProxy (runs inside the gateway host's namespace, so
# 127.0.0.1 is that host's own HAProxy).
exec /usr/bin/curl -sf -o /dev/null --max-time 1.5 http://127.0.0.1:8404/health
