# dmar-agent on an empty base (see dmar-server.Dockerfile). Expects mutual TLS
# (DMAR_TLS_DIR, DMAR_TLS_NAME): without it the agent refuses plaintext beyond loopback.
# The control port speaks TLS; the probe, which speaks cleartext HTTP/2 only, asks a
# health-only port on the container's loopback, where dmar.v1.AgentControl is SERVING
# while the ATS link is bound.
FROM scratch
COPY rootfs/ /
ENV DMAR_SERVER=server:50051 \
    DMAR_CONTROL_LISTEN=0.0.0.0:50061 \
    DMAR_METRICS_LISTEN=0.0.0.0:9465 \
    DMAR_HEALTH_LISTEN=127.0.0.1:50062
EXPOSE 50061 9465
USER 65534:65534
HEALTHCHECK --interval=2s --timeout=3s --start-period=2s --retries=15 \
    CMD ["/usr/local/bin/dmar-healthcheck", "--service", "dmar.v1.AgentControl", "127.0.0.1:50062"]
ENTRYPOINT ["/usr/local/bin/dmar-agent"]
