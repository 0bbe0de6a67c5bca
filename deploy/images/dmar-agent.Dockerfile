# dmar-agent on an empty base (see dmar-server.Dockerfile). The health probe asks the
# agent's AgentControl health, which is SERVING only while its ATS link is bound.
FROM scratch
COPY rootfs/ /
ENV DMAR_SERVER=http://server:50051 \
    DMAR_CONTROL_LISTEN=0.0.0.0:50061 \
    DMAR_METRICS_LISTEN=0.0.0.0:9465
EXPOSE 50061 9465
USER 65534:65534
HEALTHCHECK --interval=2s --timeout=3s --start-period=2s --retries=15 \
    CMD ["/usr/local/bin/dmar-healthcheck", "--service", "dmar.v1.AgentControl", "127.0.0.1:50061"]
ENTRYPOINT ["/usr/local/bin/dmar-agent"]
