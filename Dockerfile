# gateway-queue on distroless Python: no shell, no package manager, runs as the image's non-root user (65532).
# Docker lets containers bind port 80 without root (net.ipv4.ip_unprivileged_port_start=0 since Docker 20.10);
# with --network host, set PORT to 1024 or above.
FROM gcr.io/distroless/python3-debian12:nonroot

WORKDIR /app
COPY gateway_queue.py /app/gateway_queue.py

# 0.0.0.0:80 keeps twilight's published address, so clients' http://gateway-queue still works.
ENV HOST=0.0.0.0 \
    PORT=80 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

EXPOSE 80
USER 65532:65532

# No shell in the image: the module probes its own /healthz (exempt from AUTH_TOKEN) and exits 0 or 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/bin/python3", "/app/gateway_queue.py", "--healthcheck"]

# SIGTERM (docker stop) answers parked shards 503 so they retry, and exits 0 within 2 s.
ENTRYPOINT ["/usr/bin/python3", "/app/gateway_queue.py"]
