# dmar-agent on an empty base (see dmar-server.Dockerfile). Expects mutual TLS
# (DMAR_TLS_DIR, DMAR_TLS_NAME): without it the agent refuses plaintext beyond loopback.
# No HEALTHCHECK: the std-only probe speaks cleartext HTTP/2 and the control port speaks
# TLS; deploy/docker-compose.yml orders start-up with depends_on instead (docs/DEPLOY.md).
FROM scratch
COPY rootfs/ /
ENV DMAR_SERVER=server:50051 \
    DMAR_CONTROL_LISTEN=0.0.0.0:50061 \
    DMAR_METRICS_LISTEN=0.0.0.0:9465
EXPOSE 50061 9465
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/dmar-agent"]
